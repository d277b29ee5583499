"""llama.cpp engine for cortex, through llama-cpp-python.

Registered under the ``cortex.harness`` entry point as ``llamacpp``. It
loads GGUF files on CPU or, when llama.cpp was built with it, on GPUs; the
options it takes are listed in ``cortex_llamacpp.options.LoadOptions``.
"""

from __future__ import annotations

import llama_cpp

from cortex.harness import HarnessInfo, LoadedModel, LoadSpec, Placement, hookimpl

from .model import NAME, LlamaCppModel, load, need_mb
from .options import LoadOptions

__all__ = [
    "NAME",
    "LlamaCppModel",
    "LoadOptions",
    "cortex_harness_info",
    "cortex_harness_load",
    "cortex_harness_need_mb",
]


@hookimpl
def cortex_harness_info() -> HarnessInfo:
    return HarnessInfo(
        name=NAME,
        version=llama_cpp.__version__,
        formats=("gguf",),
        cuda=bool(llama_cpp.llama_supports_gpu_offload()),
    )


@hookimpl
def cortex_harness_load(spec: LoadSpec, placement: Placement) -> LoadedModel | None:
    return load(spec, placement)


@hookimpl
def cortex_harness_need_mb(spec: LoadSpec, placement: Placement) -> int | None:
    return need_mb(spec, placement)
