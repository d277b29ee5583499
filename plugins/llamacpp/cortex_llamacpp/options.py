"""The engine's load options and the context-length plan; pure, no llama.cpp.

Options come from ``LoadSpec.options``; every key is checked here so that a
typo in ``models.toml`` fails the load with the key's name instead of being
ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from cortex.errors import InvalidModelOptions, ModelLoadError
from cortex.harness import Placement
from cortex.toolcalls import check_family

#: llama.cpp rounds n_ctx up to a multiple of this internally but the Python
#: wrapper does not, and long prompts then break (FINDINGS.md).
CTX_STEP = 256
MIB = 1024 * 1024


def _int(minimum: int):
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _bool_or_auto(key: str, value: Any) -> bool | str:
    if not isinstance(value, bool) and value != "auto":
        raise ValueError("expected true, false or 'auto'")
    return value


def _switch(key: str, value: Any) -> str:
    if value not in ("auto", "on", "off"):
        raise ValueError("expected 'auto', 'on' or 'off'")
    return value


def _tool_format(key: str, value: Any) -> str:
    return check_family(_str(key, value))


def _floats(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError("expected a list of non-negative numbers")
    return tuple(float(v) for v in value)


_CHECKS = {
    "n_ctx": _int(1),
    "n_ctx_max": _int(CTX_STEP),
    "n_threads": _int(1),
    "n_gpu_layers": _int(-1),
    "main_gpu": _int(0),
    "tensor_split": _floats,
    "flash_attn": _bool,
    "chat_format": _str,
    "n_batch": _int(1),
    "tool_format": _tool_format,
    "parallel": _int(1),
    "prompt_chunk": _int(1),
    "kv_unified": _bool_or_auto,
    "kv_cells": _int(CTX_STEP),
    "extra_buffers": _switch,
    "host_cache_mb": _int(0),
}

#: The host tier's budget when nothing else says (no memory budget given).
HOST_CACHE_MB = 512
#: The host tier holds at most this many full KV pools' worth by default.
HOST_CACHE_POOLS = 8


def default_host_cache_mb(*, budget_mb: int | None, gpu: bool, pool_bytes: int) -> int:
    """The host tier's budget when ``host_cache_mb`` is not set.

    Eight full KV pools' worth (sessions beyond the slots: ten agent sessions
    of 4.5k tokens on the SmolLM2 demo take about 1 GiB), at most 1/8 of the
    memory budget on a CPU host, where it counts in the model's memory, and
    at most ``HOST_CACHE_MB`` on a GPU host.
    """
    cap = budget_mb // 8 if budget_mb is not None and not gpu else HOST_CACHE_MB
    return max(0, min(cap, -(-HOST_CACHE_POOLS * pool_bytes // MIB)))


def default_threads() -> int:
    """The physical cores less one, at least one.

    llama.cpp's threads meet at a spinning barrier every step, so a step
    runs at the pace of its slowest thread: when anything else wants a core
    (the neuron's own HTTP server and tokenizer, a gateway in standalone
    mode, a test suite), a thread on every core stalls them all. Measured on
    2 cores with a neighbour busy (contrib/bench/engine.py): 2 threads decode
    at 7.6 tokens/s, 1 thread at 52. Decode is bound by memory bandwidth, so
    a large host loses little by the core it leaves free.
    """
    return max(1, physical_cores() - 1)


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None) -> int:
    """The physical cores this process may run on (hyperthreads counted once).

    llama.cpp's threads spin at every barrier: a second thread on a core's
    sibling, or on a core something else keeps busy, slows every step
    (llama-server defaults to the physical cores for the same reason).

    Args:
      cpuinfo: the text of /proc/cpuinfo; read when None.
      allowed: the logical CPUs this process may use; its affinity when None.
    """
    if allowed is None:
        try:
            allowed = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            allowed = set(range(os.cpu_count() or 1))
    try:
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
    except OSError:
        return max(1, len(allowed))
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in block.splitlines())
        )
        if fields.get("processor", "").isdigit() and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
    return max(1, len(cores) or len(allowed))


@attrs.frozen(kw_only=True)
class LoadOptions:
    """Settings for one load, with placement-dependent defaults resolved.

    Attributes:
      n_ctx: the requested context length, or None to plan one (see plan_n_ctx).
      n_ctx_max: the cap on a planned context length.
      n_threads: CPU threads for decode and prompt processing; the physical
        cores less one by default (``default_threads``).
      n_gpu_layers: layers to offload; -1 is all.
      main_gpu: the device that holds the non-split parts.
      tensor_split: the share of each device, indexed by device index; None
        lets llama.cpp decide.
      flash_attn: use flash attention.
      chat_format: a llama-cpp-python chat format name, used when the file
        has no template.
      n_batch: the prompt-processing batch size.
      tool_format: the tool-call markup the model writes (hermes, llama3,
        mistral), when detecting it from the chat template gets it wrong.
      parallel: sequences decoded at once (continuous batching, see
        ``cortex_llamacpp.batched``); 1 is the single-sequence engine.
      kv_cells: the cells (tokens) of the unified KV pool that all
        sequences share; ``n_ctx`` by default, as llama-server's unified
        cache: any one sequence can reach ``n_ctx``, and idle slots cost
        nothing. Larger keeps more sequences' prefixes cached at once; the
        memory plan counts it. Setting it asks for the unified pool (unless
        ``kv_unified`` is false).
      prompt_chunk: the most prompt tokens evaluated per step while other
        sequences are decoding; smaller keeps their latency steadier.
      kv_unified: ``True``: one KV pool for all sequences; ``False``: one
        stream of ``n_ctx`` cells per sequence (``parallel * n_ctx`` in
        all; the planned context shrinks to fit); ``"auto"`` (default):
        per-sequence streams where they fit the memory plan at the context
        the unified pool would get, taking at most 1/8 of it beyond the
        pool, else the unified pool (``kv_layout``).
      extra_buffers: llama.cpp's extra CPU weight buffers (repacked
        layouts, AMX): ``on``, ``off``, or ``auto`` (default), which turns
        them off only where the llama.cpp build carries AMX, whose kernels
        crash on quantized models (llama.cpp issue 20824). Weights offloaded
        to a GPU are not affected.
      host_cache_mb: the host-memory tier of the prompt cache (see
        ``cortex_llamacpp.hostcache``): KV states of sequences whose slot
        was taken are kept in this much host memory and restored when a
        prompt continues them; 0 turns it off. By default eight KV pools'
        worth, at most 1/8 of the memory budget on a CPU host (counted in
        the model's memory, so the context plan fits around it) and 512 MiB
        on a GPU host (``default_host_cache_mb``). Needs ``parallel`` > 1.
    """

    n_ctx: int | None = None
    n_ctx_max: int = 32768
    n_threads: int = 1
    n_gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    flash_attn: bool = False
    chat_format: str | None = None
    n_batch: int = 512
    tool_format: str | None = None
    parallel: int = 8
    prompt_chunk: int = 128
    kv_unified: bool | str = "auto"
    kv_cells: int | None = None
    extra_buffers: str = "auto"
    host_cache_mb: int | None = None

    @classmethod
    def from_spec(
        cls,
        model_id: str,
        options: Mapping[str, Any],
        chat_format: str | None,
        placement: Placement,
    ) -> LoadOptions:
        """Check ``options`` and fill the defaults that depend on ``placement``.

        ``chat_format`` (the LoadSpec field) wins over an option of that name.

        Raises:
          InvalidModelOptions: an unknown key or a value of the wrong type.
        """
        values: dict[str, Any] = {}
        for key, value in options.items():
            check = _CHECKS.get(key)
            if check is None:
                raise InvalidModelOptions(
                    f"model {model_id!r}: unknown llamacpp option {key!r} "
                    f"(known: {', '.join(sorted(_CHECKS))})"
                )
            try:
                values[key] = check(key, value)
            except (TypeError, ValueError) as exc:
                raise InvalidModelOptions(f"model {model_id!r}: llamacpp option {key!r}: {exc}")
        if chat_format is not None:
            values["chat_format"] = chat_format

        devices = placement.devices
        values.setdefault("n_threads", default_threads())
        values.setdefault("n_gpu_layers", -1 if devices else 0)
        if devices:
            values.setdefault("main_gpu", devices[0])
        if len(devices) >= 2 and "tensor_split" not in values:
            # llama.cpp indexes tensor_split by device; devices not in the
            # placement get a zero share.
            split = [0.0] * (max(devices) + 1)
            for device in devices:
                split[device] = 1.0
            values["tensor_split"] = tuple(split)
        return cls(**values)


def kv_bytes_per_token(*, n_layer: int, n_head_kv: int, key_length: int, value_length: int) -> int:
    """The f16 KV cache size of one token: K and V for every layer, 2 bytes each."""
    return n_layer * n_head_kv * (key_length + value_length) * 2


#: ``kv_unified = "auto"`` takes per-slot streams only where what they take
#: beyond the unified pool is at most this share (1/8) of the memory budget.
PER_SLOT_SHARE = 8


@attrs.frozen
class KvLayout:
    """How the KV cache is laid out across the slots, and why.

    Attributes:
      unified: one pool all sequences share (True) or a stream of ``n_ctx``
        cells per sequence (False).
      reason: why, in words, for the load log.
    """

    unified: bool
    reason: str

    @property
    def name(self) -> str:
        """``unified`` or ``per-slot``, as the model reports it."""
        return "unified" if self.unified else "per-slot"


def kv_layout(
    options: LoadOptions,
    *,
    n_ctx: int,
    kv_per_token: int,
    other_bytes: int,
    budget_mb: int | None,
) -> KvLayout:
    """Choose the KV layout for a context of ``n_ctx`` (``kv_unified``).

    Per-slot streams keep each sequence's attention to its own cells, so
    what idle slots cache costs the others nothing, where a unified pool
    makes every step attend over the pool up to its highest used cell
    (README, "What cached prefixes cost"). ``auto`` takes them when their
    ``parallel * n_ctx`` cells fit ``budget_mb`` beside ``other_bytes``
    (weights and whatever else the plan counts) and take no more than
    ``1 / PER_SLOT_SHARE`` of it beyond the unified pool's ``n_ctx``
    (a speed default must not take the room other models load into), else
    the unified pool: the context a user gets never shrinks for this
    default. An explicit
    ``kv_cells`` only means something in a unified pool, so it asks for
    one. ``budget_mb`` None (no memory plan) fits anything, as in
    ``plan_n_ctx``.
    """
    setting = options.kv_unified
    if isinstance(setting, bool):
        return KvLayout(unified=setting, reason=f"kv_unified = {str(setting).lower()}")
    if options.parallel == 1:
        return KvLayout(unified=True, reason="one sequence")
    if options.kv_cells is not None:
        return KvLayout(unified=True, reason="kv_cells is set")
    cells = options.parallel * n_ctx
    need_mb = -(-(other_bytes + cells * kv_per_token) // MIB)
    if budget_mb is None:
        return KvLayout(unified=False, reason=f"{cells} cells, no memory budget")
    if need_mb > budget_mb:
        return KvLayout(
            unified=True,
            reason=f"per-slot streams ({cells} cells) would need {need_mb} MiB, "
            f"over the {budget_mb} MiB budget",
        )
    extra_mb = -(-((cells - n_ctx) * kv_per_token) // MIB)
    if extra_mb * PER_SLOT_SHARE > budget_mb:
        return KvLayout(
            unified=True,
            reason=f"per-slot streams ({cells} cells) would take {extra_mb} MiB more "
            f"than one pool, over 1/{PER_SLOT_SHARE} of the {budget_mb} MiB budget",
        )
    return KvLayout(
        unified=False,
        reason=f"{cells} cells fit: {need_mb} MiB of the {budget_mb} MiB budget",
    )


def kv_cells(options: LoadOptions, n_ctx: int) -> int:
    """The KV cache's cells for a per-sequence context of ``n_ctx``.

    ``options.kv_unified`` is the layout ``kv_layout`` chose, not ``auto``.
    """
    if options.parallel > 1 and options.kv_unified is False:
        return n_ctx * options.parallel
    if options.parallel > 1 and options.kv_cells is not None:
        return max(n_ctx, -(-options.kv_cells // CTX_STEP) * CTX_STEP)
    return n_ctx


def least_budget_mb(need_bytes: int, host_cache_mb: Callable[[int], int]) -> int:
    """The smallest memory budget in which a load of ``need_bytes`` fits beside its host tier.

    The default host tier grows with the budget (``default_host_cache_mb``),
    so the answer is the least budget ``b`` with ``need + host_cache_mb(b) <= b``:
    what a refusal reports as needed, so that a budget of that size (or any
    larger one) loads at once.

    Args:
      need_bytes: the weights and the smallest KV cache the load accepts.
      host_cache_mb: the host tier counted in a budget of that many MiB (at
        most 1/8 of it, so the search ends after a few steps); 0 where none.
    """
    need_mb = -(-need_bytes // MIB)
    budget = need_mb
    while (total := need_mb + host_cache_mb(budget)) > budget:
        budget = total
    return budget


def plan_n_ctx(
    *,
    model_id: str,
    requested: int | None,
    n_ctx_train: int | None,
    n_ctx_max: int,
    weights_bytes: int,
    kv_per_token: int,
    budget_mb: int | None,
) -> int:
    """Choose the context length to load with; always a multiple of 256.

    A requested n_ctx is rounded up and used as given. Otherwise it is the
    trained length, capped by ``n_ctx_max`` and by what fits in ``budget_mb``
    next to the weights (llama-server's "fit", with the KV cache the only
    thing that shrinks), rounded down, at least 256.

    Raises:
      ModelLoadError: the weights plus the smallest (or the requested)
        context do not fit in ``budget_mb``.
    """
    if requested is not None:
        n_ctx = -(-requested // CTX_STEP) * CTX_STEP
    else:
        n_ctx = min(n_ctx_train or n_ctx_max, n_ctx_max)
        if budget_mb is not None and kv_per_token > 0:
            fits = (budget_mb * MIB - weights_bytes) // kv_per_token
            n_ctx = min(n_ctx, fits)
        n_ctx = max(CTX_STEP, n_ctx // CTX_STEP * CTX_STEP)
    if budget_mb is not None:
        need_mb = -(-(weights_bytes + n_ctx * kv_per_token) // MIB)
        if need_mb > budget_mb:
            raise ModelLoadError(
                f"model {model_id!r} needs {need_mb} MiB with n_ctx={n_ctx}, "
                f"over its memory budget of {budget_mb} MiB"
            )
    return n_ctx
