"""Loading a model file with ctransformers, and the loaded model.

Everything here blocks; the neuron calls it from worker threads, one
generation at a time per model.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import pathlib
import platform
import random
import threading
from collections.abc import Iterator
from typing import Any

import attrs
from ctransformers import LLM, Config
from ctransformers.lib import find_library

from cortex.errors import (
    ChatTemplateMissing,
    ContextOverflow,
    HarnessError,
    InsufficientMemory,
    InvalidModelFile,
    InvalidModelOptions,
    InvalidRequest,
    ModelLoadError,
    UnsupportedModelFormat,
)
from cortex.harness import ChatPrompt, LoadedModel, LoadSpec, Placement, Sampling, Token

from . import chat, formats
from .options import MODEL_TYPES, LoadOptions

NAME = "ctransformers"
MIB = 1024 * 1024

# The ggml-example evaluators (gpt2_eval, gptj_eval, ...) keep their scratch
# buffer in a function-level static, shared by every model of that
# architecture in the process: two such models must not evaluate at once
# (two gpt2 models generating in two threads crash the process).
_eval_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)


@functools.cache
def default_lib() -> str:
    """The bundled ctransformers build for this CPU, decided once per process.

    ctransformers otherwise asks py-cpuinfo on every load (about a second).
    On x86 Linux the flags come from /proc/cpuinfo in microseconds; elsewhere
    ctransformers' own detection runs, once.
    """
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "i686"):
        try:
            with open("/proc/cpuinfo") as f:
                flags: set[str] = set()
                for line in f:
                    if line.startswith("flags"):
                        flags.update(line.partition(":")[2].split())
                        break
        except OSError:
            flags = set()
        if "avx2" in flags:
            return "avx2"
        if "avx" in flags and "f16c" in flags:
            return "avx"
        if flags:
            return "basic"
    return find_library()


@attrs.frozen
class _Plan:
    """How to load a file, decided from its header before ctransformers sees it."""

    #: The ctransformers model type; None for GGUF (ctransformers' llama.cpp).
    model_type: str | None
    #: The context to ask for; -1 keeps the file's.
    context_length: int
    n_ctx_train: int | None
    #: The KV cache of one token, when the layout is known; else 0.
    kv_per_token: int


def _plan_gguf(where: str, path: pathlib.Path, options: LoadOptions) -> _Plan:
    try:
        info = formats.read_gguf(path)
    except formats.FormatError as exc:
        raise InvalidModelFile(f"{where}: cannot read the GGUF header ({exc})")
    # The llama.cpp inside ctransformers 0.2.27 is from autumn 2023; it
    # crashes on GGUF files it does not know (a gpt2-BPE tokenizer, say).
    if options.model_type not in (None, "llama"):
        raise ModelLoadError(
            f"{where}: a GGUF file; ctransformers reads GGUF only as llama, "
            f"not as model_type {options.model_type!r}"
        )
    if info.architecture != "llama" or info.tokenizer != "llama":
        raise UnsupportedModelFormat(
            f"{where}: ctransformers reads GGUF only for llama-architecture models "
            f"with a SentencePiece tokenizer; this file is architecture "
            f"{info.architecture!r} with tokenizer {info.tokenizer!r} (use llamacpp)"
        )
    unknown = sorted(info.tensor_types - formats.GGUF_TENSOR_TYPES)
    if unknown:
        raise UnsupportedModelFormat(
            f"{where}: tensor types {unknown} are newer than ctransformers' llama.cpp "
            f"(use llamacpp)"
        )
    n_ctx_train = info.hparam("context_length")
    n_layer = info.hparam("block_count") or 0
    n_embd = info.hparam("embedding_length") or 0
    n_head = info.hparam("attention.head_count") or 1
    n_head_kv = info.hparam("attention.head_count_kv") or n_head
    context = options.context_length or min(n_ctx_train or 2048, options.n_ctx_max)
    return _Plan(
        model_type=None,
        context_length=context,
        n_ctx_train=n_ctx_train,
        # f16 K and V for every layer.
        kv_per_token=2 * n_layer * (n_embd * n_head_kv // n_head) * 2,
    )


def _plan_ggml(where: str, path: pathlib.Path, container: str, options: LoadOptions) -> _Plan:
    model_type = options.model_type or formats.default_model_type(container)
    hparams = formats.read_gpt2_hparams(path)
    if model_type is None:
        # Plain 'ggml' files do not say what they are. The gpt2 header layout
        # can be recognised (starcoder shares it and then fails cleanly on
        # tensor shapes); for anything else the operator has to say.
        if hparams is None:
            raise ModelLoadError(
                f"{where}: GGML files do not record their architecture and this one "
                f"is not in the gpt2 layout; set the model_type option "
                f"(one of {', '.join(MODEL_TYPES)})"
            )
        model_type = "gpt2"
    kv_per_token = 0
    n_ctx_train = None
    if model_type in ("gpt2", "starcoder", "gpt_bigcode"):
        if hparams is None:
            # ctransformers would "load" zeros as an empty model and crash later.
            raise InvalidModelFile(f"{where}: not a valid {model_type} GGML header")
        n_ctx_train = hparams.n_ctx
        # F32 K and V for every layer (an upper bound for starcoder's MQA).
        kv_per_token = 2 * hparams.n_layer * hparams.n_embd * 4
    return _Plan(
        model_type=model_type,
        # Models with learned positions (gpt2, starcoder) keep the file's
        # context whatever is asked; the others honour it.
        context_length=options.context_length or -1,
        n_ctx_train=n_ctx_train,
        kv_per_token=kv_per_token,
    )


@attrs.frozen
class _Prepared:
    """A load as far as it goes without ctransformers: the file, options and plan."""

    where: str
    path: pathlib.Path
    options: LoadOptions
    plan: _Plan
    weights_bytes: int

    def context(self, budget_mb: int | None) -> int:
        """The context to ask for in ``budget_mb`` (-1: the file's)."""
        context = self.plan.context_length
        if self.shrinks and budget_mb is not None:
            # As llama.cpp's engine does: shrink a context taken from the file to fit.
            room = (budget_mb * MIB - self.weights_bytes) // self.plan.kv_per_token
            context = max(1, min(context, room))
        return context

    @property
    def shrinks(self) -> bool:
        """Whether the context, taken from the file, shrinks to fit a budget."""
        plan = self.plan
        return (
            plan.context_length > 0 and bool(plan.kv_per_token) and not self.options.context_length
        )

    def need_mb(self, context: int) -> tuple[int, int]:
        """MiB for the weights and ``context`` (as ``context`` gives it), and that context."""
        expected = context if context > 0 else self.plan.n_ctx_train or 0
        return -(-(self.weights_bytes + expected * self.plan.kv_per_token) // MIB), expected


def _prepare(spec: LoadSpec) -> _Prepared | None:
    """Read the header and options of a load; None when the load is not ours.

    With no harness named, it takes GGML-era files only and leaves GGUF to
    llama.cpp; named, it also takes the GGUF files ctransformers can read.

    Raises:
      ModelLoadError: the load is ours and cannot succeed (the file, the options).
    """
    if spec.harness is not None and spec.harness != NAME:
        return None
    path = pathlib.Path(spec.path)
    # Messages name the file, never its directory: they reach HTTP clients.
    where = f"model {spec.model_id!r} ({path.name})"
    try:
        container = formats.sniff(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: file not found")
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read the file ({exc.strerror})")
    if spec.harness is None and container in (None, "gguf"):
        return None
    if container is None:
        raise UnsupportedModelFormat(f"{where}: not a GGML or GGUF file")
    options = LoadOptions.from_spec(spec.model_id, spec.options, spec.chat_format)
    if options.chat_format is not None and options.chat_format not in chat.FORMATS:
        raise InvalidModelOptions(
            f"{where}: unknown chat_format {options.chat_format!r} "
            f"(the ctransformers engine knows {', '.join(chat.FORMATS)})",
            param="chat_format",
        )
    try:
        if container == "gguf":
            plan = _plan_gguf(where, path, options)
        else:
            plan = _plan_ggml(where, path, container, options)
        weights_bytes = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read the file ({exc.strerror})")
    return _Prepared(where, path, options, plan, weights_bytes)


def need_mb(spec: LoadSpec, placement: Placement) -> int | None:
    """The ``cortex_harness_need_mb`` hook: see ``cortex.harness.HarnessSpec``."""
    prepared = _prepare(spec)
    if prepared is None:
        return None
    # The least context the load accepts: one token where it shrinks.
    return prepared.need_mb(1 if prepared.shrinks else prepared.plan.context_length)[0]


def load(spec: LoadSpec, placement: Placement) -> CTransformersModel | None:
    """The ``cortex_harness_load`` hook: see ``cortex.harness.HarnessSpec``."""
    prepared = _prepare(spec)
    if prepared is None:
        return None
    where, path, options, plan = prepared.where, prepared.path, prepared.options, prepared.plan
    weights_bytes = prepared.weights_bytes
    budget = placement.memory_budget_mb
    context = prepared.context(budget)
    need_mb, expected_ctx = prepared.need_mb(context)
    if budget is not None and need_mb > budget:
        # The context is already the least this load accepts (one token where
        # it shrinks, else the one asked for or the file's): a gateway can
        # unload others to make this much room and ask again.
        raise InsufficientMemory(
            f"{where}: needs at least {need_mb} MiB (its weights and a context of "
            f"{expected_ctx}), {budget} MiB is free for it",
            need_mb=need_mb,
        )

    config = Config(
        context_length=context,
        threads=options.threads,
        batch_size=options.batch_size,
        last_n_tokens=options.last_n_tokens,
        gpu_layers=0,
    )
    as_type = plan.model_type or "gguf"
    try:
        llm = LLM(str(path), plan.model_type, config=config, lib=options.lib or default_lib())
    except Exception as exc:
        # ctransformers' messages carry the full path: keep them out.
        raise ModelLoadError(
            f"{where}: ctransformers failed to load it as {as_type!r} ({type(exc).__name__}); "
            f"if it is another architecture, set the model_type option"
        ) from exc
    if llm.vocab_size <= 0 or llm.context_length <= 0:
        raise ModelLoadError(f"{where}: ctransformers loaded an empty {as_type!r} model")
    n_ctx = min(llm.context_length, options.context_length or options.n_ctx_max)
    return CTransformersModel(
        model_id=spec.model_id,
        llm=llm,
        n_ctx=n_ctx,
        n_ctx_train=plan.n_ctx_train,
        memory_bytes=weights_bytes + llm.context_length * plan.kv_per_token,
        chat_format=options.chat_format,
        # GGUF runs on llama.cpp contexts, which keep their buffers per context.
        lock=_eval_locks[as_type] if plan.model_type else threading.Lock(),
    )


class CTransformersModel(LoadedModel):
    """A model loaded by ctransformers: one context, one sequence at a time."""

    harness = NAME

    def __init__(
        self,
        *,
        model_id: str,
        llm: LLM,
        n_ctx: int,
        n_ctx_train: int | None,
        memory_bytes: int,
        chat_format: str | None,
        lock: threading.Lock,
    ) -> None:
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.n_ctx_train = n_ctx_train
        self.model_type: str = llm.model_type
        self._llm: LLM | None = llm
        self._n_vocab: int = llm.vocab_size
        self._memory_bytes = memory_bytes
        self._chat_format = chat_format
        self._eval_lock = lock

    def __repr__(self) -> str:
        return f"<CTransformersModel {self.model_id!r} {self.model_type} n_ctx={self.n_ctx}>"

    def _live(self) -> LLM:
        if self._llm is None:
            raise HarnessError(f"model {self.model_id!r} is unloaded")
        return self._llm

    def memory_mb(self) -> int:
        """The file size plus the KV cache estimate for the loaded context.

        The KV cache is counted for gpt2/starcoder (F32) and GGUF llama (F16)
        files, whose headers give its size; for other GGML architectures only
        the file is counted. Scratch buffers (ggml's gpt2 keeps a 256 MiB one,
        shared per architecture) are not.
        """
        self._live()
        return -(-self._memory_bytes // MIB)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize ``text``. ctransformers has no special-token parsing: ``special``
        is ignored, and GGML architectures ignore ``add_bos`` (they have no BOS)."""
        llm = self._live()
        data = text.encode("utf-8")
        # Not LLM.tokenize: it sizes its buffer in characters, not bytes, and
        # non-ASCII text overflows it. A token covers at least one byte; add
        # room for BOS and SentencePiece's leading space.
        buf = (ctypes.c_int * (len(data) + 8))()
        n = llm.ctransformers_llm_tokenize(data, add_bos, buf)
        return list(buf[:n])

    def _format(self) -> str:
        self._live()
        if self._chat_format is None:
            raise ChatTemplateMissing(
                f"model {self.model_id!r} has no chat template (ctransformers' formats "
                f"carry none); set chat_format (one of {', '.join(chat.FORMATS)}) "
                f"in its catalogue entry"
            )
        return self._chat_format

    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        return chat.render(self._format(), messages, tools)

    def render_prefilled(
        self,
        messages: list[dict[str, Any]],
        prefill: str,
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatPrompt:
        """See LoadedModel.render_prefilled: the prefill as the format writes an answer."""
        return chat.render_prefilled(self._format(), messages, prefill, tools)

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        """See LoadedModel.generate. Also ends when the context is full.

        Sampling is ctransformers' own: temperature, top_k, top_p and the
        repetition penalty. min_p and the presence and frequency penalties are
        ignored; an output constraint (JSON schema, forced tool calls) is
        refused: ctransformers has no grammar sampler. Closing the iterator early leaves the
        context reusable: the next call evaluates only what differs.

        Raises:
          ContextOverflow: the prompt does not leave room for one token.
          InvalidRequest: an empty prompt, a token id outside the vocabulary,
            or an output constraint.
        """
        llm = self._live()
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        if not all(0 <= t < self._n_vocab for t in tokens):
            # ggml reads embedding rows by id, unchecked.
            raise InvalidRequest(f"token ids must be in [0, {self._n_vocab})", param="prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow.of(len(tokens), self.n_ctx, param="prompt")
        if sampling.constraint is not None:
            raise InvalidRequest(
                f"model {self.model_id!r} cannot constrain its output: the ctransformers "
                "engine has no grammar sampler (use a llama.cpp model for response_format "
                "or a forced tool_choice)",
                param=sampling.constraint.param,
            )
        if sampling.temperature <= 0:
            # Its sampler divides by the temperature: greedy is top_k=1.
            top_k, temperature = 1, 1.0
        else:
            # top_k <= 0 would leave it nothing to sample from.
            top_k = sampling.top_k if sampling.top_k > 0 else self._n_vocab
            temperature = sampling.temperature
        top_p = min(max(sampling.top_p, 0.0), 1.0)
        # Its sampler seeds a fresh generator on every call, and a negative
        # seed means time(): vary the seed per step ourselves.
        seed = random.getrandbits(31) if sampling.seed is None else sampling.seed

        def sample(step: int) -> int:
            return llm.sample(
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                repetition_penalty=sampling.repeat_penalty,
                seed=(seed + step) % 2**31,
            )

        with self._eval_lock:
            llm.eval(llm.prepare_inputs_for_generation(tokens, reset=True))
        n = len(tokens)
        step = 0
        while True:
            token = sample(step)
            step += 1
            if llm.is_eos_token(token):
                return
            # c_char_p stops at NUL: a token whose text holds one comes out short.
            yield Token(id=token, piece=llm.detokenize([token], decode=False))
            n += 1
            if n >= self.n_ctx:
                return
            with self._eval_lock:
                llm.eval([token])

    def unload(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Free now rather than whenever the last reference goes; clearing
            # LLM._llm keeps its __del__ from freeing twice.
            llm.ctransformers_llm_delete()
            llm._llm = None
