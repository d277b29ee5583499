"""ctransformers engine for cortex: GGML-era models llama.cpp no longer loads.

Registered under the ``cortex.harness`` entry point as ``ctransformers``.
With no engine named, it takes legacy GGML files (gpt2 recognised from its
header; other architectures need the ``model_type`` option) and leaves GGUF
to llama.cpp; named, it also reads GGUF llama files with a SentencePiece
tokenizer. Headers are checked in Python first: ctransformers crashes the
process on some files it cannot read. Options are listed in
``cortex_ctransformers.options.LoadOptions``; chat formats in
``cortex_ctransformers.chat.FORMATS``.
"""

from __future__ import annotations

from importlib.metadata import version

from cortex.harness import HarnessInfo, LoadedModel, LoadSpec, Placement, hookimpl

from .model import NAME, CTransformersModel, load, need_mb
from .options import LoadOptions

__all__ = [
    "NAME",
    "CTransformersModel",
    "LoadOptions",
    "cortex_harness_info",
    "cortex_harness_load",
    "cortex_harness_need_mb",
]


@hookimpl
def cortex_harness_info() -> HarnessInfo:
    # CPU only: the CUDA build needs gpu_layers and NVIDIA's pip wheels, unverified here.
    return HarnessInfo(
        name=NAME, version=version("ctransformers"), formats=("ggml", "gguf"), cuda=False
    )


@hookimpl
def cortex_harness_load(spec: LoadSpec, placement: Placement) -> LoadedModel | None:
    return load(spec, placement)


@hookimpl
def cortex_harness_need_mb(spec: LoadSpec, placement: Placement) -> int | None:
    return need_mb(spec, placement)
