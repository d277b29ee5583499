"""Loading a GGUF file with llama-cpp-python, and the loaded model.

Everything here blocks; the neuron calls it from worker threads, one call at
a time per model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import pathlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import llama_cpp
from llama_cpp import llama_chat_format

from cortex.chat_template import TemplateSupport, adapt_chat, probe_template
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
from cortex.harness import (
    CancellableTokens,
    ChatPrompt,
    LoadedModel,
    LoadSpec,
    Placement,
    PromptCacheStatistics,
    Sampling,
    Token,
    common_prefix,
)
from cortex.toolcalls import MARKUP, detect_family

from .batched import BatchedDecoder, Cancellation
from .grammar import grammar_for
from .options import (
    CTX_STEP,
    MIB,
    LoadOptions,
    default_host_cache_mb,
    kv_bytes_per_token,
    kv_cells,
    kv_layout,
    least_budget_mb,
    plan_n_ctx,
)

NAME = "llamacpp"
GGUF_MAGIC = b"GGUF"

log = logging.getLogger(__name__)

# llama-cpp-python, with verbose=False, silences llama.cpp during a load by
# dup2()-ing /dev/null over the process's fds 1 and 2 and back. Two loads
# interleaving that can leave stdout pointing at /dev/null for good, so
# loads (and our own header probe) take turns.
_load_lock = threading.Lock()
_backend_ready = False

ChatFormatter = Callable[..., llama_chat_format.ChatFormatterResponse]

_TOJSON_ARGUMENTS = re.compile(r"arguments\s*\|\s*tojson")


def is_gguf(path: pathlib.Path) -> bool:
    """Whether ``path`` starts with the GGUF magic. Raises OSError if unreadable."""
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


@attrs.frozen
class _Hparams:
    """What the context plan needs from the file, read without the weights."""

    n_ctx_train: int
    kv_per_token: int


def _meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """A scalar metadata value as text; None when absent or an array."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def _meta_int(model: llama_cpp.llama_model_p, key: str) -> int | None:
    value = _meta(model, key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _probe(path: pathlib.Path) -> _Hparams | None:
    """Read the hyperparameters with a vocab-only load; None if llama.cpp cannot.

    A vocab-only load parses the header with llama.cpp's own reader (so it
    fails where the real load would) and skips the tensors: milliseconds
    even for large files, where gguf.GGUFReader walks every token in Python.
    It does not fill the hyperparameters (llama_model_n_* read 0 or abort),
    so they come from the metadata, as llama.cpp itself reads them.
    """
    global _backend_ready
    if not _backend_ready:
        # Llama(verbose=False) does the same to llama-cpp-python's log
        # callback; before the first Llama it would print every line.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        _backend_ready = True
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    try:
        arch = _meta(model, "general.architecture") or ""

        def hparam(key: str) -> int | None:
            return _meta_int(model, f"{arch}.{key}")

        n_layer = hparam("block_count") or 0
        n_embd = hparam("embedding_length") or 0
        n_head = hparam("attention.head_count")
        # Per-layer head counts are arrays (None here): assume no GQA.
        n_head_kv = hparam("attention.head_count_kv") or n_head
        if not n_head or not n_head_kv:
            n_head = n_head_kv = 1
        head_dim = n_embd // n_head
        return _Hparams(
            n_ctx_train=hparam("context_length") or 0,
            # An estimate: it ignores sliding-window layers and recurrent
            # state, so it errs on the large side for those models.
            kv_per_token=kv_bytes_per_token(
                n_layer=n_layer,
                n_head_kv=n_head_kv,
                key_length=hparam("attention.key_length") or head_dim,
                value_length=hparam("attention.value_length") or head_dim,
            ),
        )
    finally:
        llama_cpp.llama_model_free(model)


def use_extra_buffers(setting: str, system_info: bytes | None = None) -> bool:
    """Whether to load with llama.cpp's extra CPU weight buffers.

    ``auto`` turns them off only where the build carries the AMX buffers:
    they are compiled in only when the compiler targets AMX (a native build
    on a CPU with it), and their matrix multiply segfaults on quantized
    models there (FINDINGS.md; llama.cpp issue 20824). Elsewhere the repacked
    layouts stay: they are safe, and faster for the types they cover.

    Args:
      setting: the ``extra_buffers`` option: ``auto``, ``on`` or ``off``.
      system_info: llama.cpp's system info line; this build's when None.
    """
    if setting != "auto":
        return setting == "on"
    if system_info is None:
        system_info = llama_cpp.llama_print_system_info()
    return b"AMX_INT8 = 1" not in system_info


@contextlib.contextmanager
def model_params(*, use_extra_bufts: bool) -> Iterator[None]:
    """Make ``llama_cpp.Llama`` load with ``use_extra_bufts`` set as given.

    ``Llama`` takes no argument for it and builds its model parameters from
    ``llama_model_default_params`` inside ``__init__``: wrap that for the
    duration. Callers hold ``_load_lock`` (or are alone in the process).
    """
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        value = default()
        value.use_extra_bufts = use_extra_bufts
        return value

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its tool calls' JSON-string arguments decoded, for templates."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    decoded = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function = {**function, "arguments": json.loads(arguments or "{}")}
            except ValueError:
                pass  # not JSON: the template gets the string as sent
        decoded.append({**call, "function": function})
    return {**message, "tool_calls": decoded}


def _registered_formatter(name: str) -> ChatFormatter | None:
    """The chat formatter llama-cpp-python registered under ``name``, if any.

    The registry holds completion handlers; a ``@register_chat_format``
    handler keeps its formatter in its closure as ``chat_formatter``. Other
    handlers (functionary, llava, ...) need a whole Llama call, not a prompt
    template, and are not usable here.
    """
    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except Exception:  # LlamaChatCompletionHandlerNotFoundException
        return None
    code = getattr(handler, "__code__", None)
    if code is None or "chat_formatter" not in code.co_freevars:
        return None
    return handler.__closure__[code.co_freevars.index("chat_formatter")].cell_contents


@attrs.frozen
class _Prepared:
    """A load as far as it goes without the weights: its file, options and least size."""

    where: str
    path: pathlib.Path
    options: LoadOptions
    formatter: ChatFormatter | None
    weights_bytes: int
    hparams: _Hparams
    #: The longest context the load may plan (the file's, capped by n_ctx_max).
    longest: int
    #: Whether the model is on GPUs (the host tier then is not in the budget).
    gpu: bool
    #: KV cells in the smallest form the options accept.
    least_cells: int

    @property
    def batched(self) -> bool:
        return self.options.parallel > 1

    @functools.cached_property
    def need_mb(self) -> int:
        """The least budget (MiB) the load fits in."""
        # The host tier counts where it shares the budget: batched, on a CPU host.
        counted = self.host_cache_mb if self.batched and not self.gpu else (lambda budget: 0)
        return least_budget_mb(
            self.weights_bytes + self.least_cells * self.hparams.kv_per_token, counted
        )

    def host_cache_mb(self, budget_mb: int | None) -> int:
        """The host tier (MiB) beside a budget of ``budget_mb``."""
        if self.options.host_cache_mb is not None:
            return self.options.host_cache_mb
        return default_host_cache_mb(
            budget_mb=budget_mb,
            gpu=self.gpu,
            pool_bytes=self.longest * self.hparams.kv_per_token,
        )

    def check_fits(self, budget_mb: int) -> None:
        """Refuse a load whose smallest form does not fit in ``budget_mb``.

        The refusal says how much that is, so that a gateway can unload
        other models to make the room and ask again.

        Raises:
          InsufficientMemory: it does not fit; ``need_mb`` is the least budget it fits in.
        """
        if self.need_mb > budget_mb:
            counted = self.batched and not self.gpu
            host = f" and its host_cache_mb={self.host_cache_mb(self.need_mb)}" if counted else ""
            raise InsufficientMemory(
                f"{self.where}: needs at least {self.need_mb} MiB "
                f"(its weights, {self.least_cells} KV cells{host}), "
                f"{budget_mb} MiB is free for it",
                need_mb=self.need_mb,
            )


def _prepare(spec: LoadSpec, placement: Placement) -> _Prepared | None:
    """Read what a load needs before its weights; None when the load is not ours.

    The least size is the weights, the least context the options accept
    (256 cells, or the ``n_ctx`` asked for) in the KV layout they ask for,
    the small context a batched model keeps for tokenize, and the host tier
    where it counts (batched, on a CPU host): below that, the context plan
    has nothing left to shrink.

    Raises:
      ModelLoadError: the load is ours and cannot succeed (the file, the options).
    """
    if spec.harness is not None and spec.harness != NAME:
        return None
    path = pathlib.Path(spec.path)
    # Messages name the file, never its directory: they reach HTTP clients.
    where = f"model {spec.model_id!r} ({path.name})"
    try:
        gguf = is_gguf(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: file not found")
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read the file ({exc.strerror})")
    if not gguf:
        if spec.harness is None:
            return None
        raise UnsupportedModelFormat(f"{where}: not a GGUF file")
    options = LoadOptions.from_spec(spec.model_id, spec.options, spec.chat_format, placement)
    formatter = None
    if options.chat_format is not None:
        formatter = _registered_formatter(options.chat_format)
        if formatter is None:
            raise InvalidModelOptions(
                f"{where}: unknown chat_format {options.chat_format!r}", param="chat_format"
            )

    if options.parallel > llama_cpp.llama_max_parallel_sequences():
        raise InvalidModelOptions(
            f"{where}: parallel is at most {llama_cpp.llama_max_parallel_sequences()}"
        )
    weights_bytes = path.stat().st_size
    with _load_lock:
        hparams = _probe(path)
    if hparams is None:
        raise InvalidModelFile(
            f"{where}: llama.cpp cannot read this GGUF file "
            "(truncated, damaged, or an architecture it does not know)"
        )
    least_ctx = CTX_STEP if options.n_ctx is None else -(-options.n_ctx // CTX_STEP) * CTX_STEP
    cells = kv_cells(options, least_ctx) + (CTX_STEP if options.parallel > 1 else 0)
    return _Prepared(
        where=where,
        path=path,
        options=options,
        formatter=formatter,
        weights_bytes=weights_bytes,
        hparams=hparams,
        longest=min(hparams.n_ctx_train or options.n_ctx_max, options.n_ctx_max),
        gpu=bool(placement.devices),
        least_cells=cells,
    )


def need_mb(spec: LoadSpec, placement: Placement) -> int | None:
    """The ``cortex_harness_need_mb`` hook: see ``cortex.harness.HarnessSpec``."""
    prepared = _prepare(spec, placement)
    return None if prepared is None else prepared.need_mb


def load(spec: LoadSpec, placement: Placement) -> LlamaCppModel | None:
    """The ``cortex_harness_load`` hook: see ``cortex.harness.HarnessSpec``."""
    prepared = _prepare(spec, placement)
    if prepared is None:
        return None
    if placement.memory_budget_mb is not None:
        prepared.check_fits(placement.memory_budget_mb)
    where, path, options = prepared.where, prepared.path, prepared.options
    formatter, hparams, batched = prepared.formatter, prepared.hparams, prepared.batched
    weights_bytes = prepared.weights_bytes
    host_cache_mb = prepared.host_cache_mb(placement.memory_budget_mb)
    with _load_lock:
        host_cache_bytes = host_cache_mb * MIB if batched else 0
        # On a CPU host the host tier shares the memory budget with the model.
        counted_bytes = weights_bytes + (0 if placement.devices else host_cache_bytes)
        # Batched, a small context for tokenize and metadata comes too.
        other_bytes = counted_bytes + (CTX_STEP * hparams.kv_per_token if batched else 0)
        n_ctx = plan_n_ctx(
            model_id=spec.model_id,
            requested=options.n_ctx,
            n_ctx_train=hparams.n_ctx_train or None,
            n_ctx_max=options.n_ctx_max,
            weights_bytes=other_bytes,
            # Forced per-sequence streams hold parallel x n_ctx cells; a
            # unified pool n_ctx, or kv_cells when set (checked below).
            # "auto" plans as a unified pool: the context never shrinks for
            # the layout's sake.
            kv_per_token=hparams.kv_per_token
            * (options.parallel if options.kv_unified is False else 1),
            budget_mb=placement.memory_budget_mb,
        )
        layout = kv_layout(
            options,
            n_ctx=n_ctx,
            kv_per_token=hparams.kv_per_token,
            other_bytes=other_bytes,
            budget_mb=placement.memory_budget_mb,
        )
        options = attrs.evolve(options, kv_unified=layout.unified)
        if batched:
            log.info(
                "model %r: %s KV cache, n_ctx %d x %d slots (%s)",
                spec.model_id,
                layout.name,
                n_ctx,
                options.parallel,
                layout.reason,
            )
        # check_fits saw to it that this pool fits: kv_cells asks for at least it.
        pool = kv_cells(options, n_ctx)
        extra_buffers = use_extra_buffers(options.extra_buffers)
        try:
            with model_params(use_extra_bufts=extra_buffers):
                llama = llama_cpp.Llama(
                    model_path=str(path),
                    verbose=False,
                    # Batched, this context only serves tokenize and metadata; the
                    # decoder makes its own: keep this one (and its buffers) small.
                    n_ctx=CTX_STEP if batched else n_ctx,
                    n_batch=8 if batched else options.n_batch,
                    n_ubatch=8 if batched else 512,
                    n_threads=options.n_threads,
                    n_threads_batch=options.n_threads,
                    n_gpu_layers=options.n_gpu_layers,
                    main_gpu=options.main_gpu,
                    tensor_split=list(options.tensor_split) if options.tensor_split else None,
                    flash_attn=options.flash_attn,
                    logits_all=False,
                )
        except Exception as exc:
            # llama-cpp-python's messages carry the full path: keep them out.
            raise ModelLoadError(
                f"{where}: llama.cpp failed to load it ({type(exc).__name__})"
            ) from exc
        # --- continuous batching (batched.py) ---
        decoder = None
        kv_tokens = n_ctx
        if batched:
            try:
                decoder = BatchedDecoder(
                    model=llama.model,
                    params=llama.context_params,
                    parallel=options.parallel,
                    n_ctx=n_ctx,
                    kv_cells=pool,
                    n_batch=options.n_batch,
                    prompt_chunk=options.prompt_chunk,
                    kv_unified=layout.unified,
                    keep_alive=llama,
                    host_cache_bytes=host_cache_bytes,
                )
            except HarnessError as exc:
                llama.close()
                raise ModelLoadError(f"{where}: {exc.message}") from None
            except BaseException:
                llama.close()
                raise
            # The small context above serves tokenize and metadata.
            kv_tokens = decoder.kv_cells + CTX_STEP
        # --- end continuous batching ---
    try:
        return LlamaCppModel(
            model_id=spec.model_id,
            llama=llama,
            n_ctx_train=hparams.n_ctx_train or None,
            memory_bytes=counted_bytes + kv_tokens * hparams.kv_per_token,
            chat_format=formatter,
            decoder=decoder,
            tool_format=options.tool_format,
            kv_layout=layout.name if batched else None,
        )
    except BaseException as exc:
        # A broken chat template (say) must not leave the weights loaded.
        if decoder is not None:
            decoder.close()
        llama.close()
        if isinstance(exc, Exception) and not isinstance(exc, HarnessError):
            raise ModelLoadError(f"{where}: {type(exc).__name__}: {exc}") from exc
        raise


class LlamaCppModel(LoadedModel):
    """A GGUF model loaded into llama.cpp.

    With a ``decoder`` it serves up to ``decoder.parallel`` sequences at once
    (``generate`` may be called from that many threads); without one, one
    sequence at a time through llama-cpp-python's own ``Llama.generate``.
    """

    harness = NAME

    def __init__(
        self,
        *,
        model_id: str,
        llama: llama_cpp.Llama,
        n_ctx_train: int | None,
        memory_bytes: int,
        chat_format: ChatFormatter | None,
        decoder: BatchedDecoder | None = None,
        tool_format: str | None = None,
        kv_layout: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.kv_layout = kv_layout
        self._decoder = decoder
        self.parallel = decoder.parallel if decoder else 1
        self.n_ctx = decoder.n_ctx if decoder else llama.n_ctx()
        self.n_ctx_train = n_ctx_train
        self._llama: llama_cpp.Llama | None = llama
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._markup_tokens: frozenset[int] = frozenset()
        self._memory_bytes = memory_bytes
        # The single-sequence engine's prompt cache (llama-cpp-python's own
        # prefix reuse); the decoder keeps its own.
        self._hits = 0
        self._misses = 0
        self._reused_tokens = 0
        # Its progress count: prompt chunks and tokens evaluated.
        self._evaluated = 0
        self._bos_text = self._special_text(llama.token_bos())
        template = llama.metadata.get("tokenizer.chat_template")
        self._formatter: ChatFormatter | None
        if template:
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=self._special_text(llama.token_eos()),
                bos_token=self._bos_text,
            )
        else:
            self._formatter = chat_format
        #: What the template renders; render_chat writes the rest as text.
        self.template_support = TemplateSupport()
        if self._formatter is not None:
            self.template_support = probe_template(self._render_text)
            self._log_template_support()
        metadata = llama.metadata
        if tool_format is None and not self.template_support.tools:
            # render_chat writes the tools in Hermes form and asks for calls in it.
            tool_format = "hermes"
        self.tool_format = tool_format or detect_family(
            template, name=metadata.get("general.name") or metadata.get("general.basename")
        )
        # Tool-call markup is often one special token (Mistral's [TOOL_CALLS],
        # Llama's <|python_tag|>): its text must reach the neuron's parser.
        self._markup_tokens = frozenset(
            ids[0]
            for ids in (llama.tokenize(m.encode(), add_bos=False, special=True) for m in MARKUP)
            if len(ids) == 1
        )
        # Most templates write an assistant turn's tool-call arguments with
        # `| tojson` and expect an object, where OpenAI messages hold a string.
        self._object_arguments = bool(template and _TOJSON_ARGUMENTS.search(template))

    def __repr__(self) -> str:
        return f"<LlamaCppModel {self.model_id!r} n_ctx={self.n_ctx}>"

    def _render_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str:
        assert self._formatter is not None
        return self._formatter(messages=messages, tools=tools).prompt

    def _log_template_support(self) -> None:
        support = self.template_support
        if not support.system:
            log.info(
                "model %r: its chat template takes no system role; system messages "
                "are folded into the next user turn",
                self.model_id,
            )
        if not support.tools:
            log.info(
                "model %r: its chat template ignores tools; they are written into the "
                "system text in Hermes form",
                self.model_id,
            )

    def _live(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise HarnessError(f"model {self.model_id!r} is unloaded")
        return self._llama

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        """The exact bytes ``token`` adds to the text.

        llama_token_to_piece directly, not Llama.detokenize: that one ignores
        prev_tokens, drops a leading space after BOS, and truncates pieces
        longer than 32 bytes.
        """
        special = special or token in self._markup_tokens
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def prompt_cache(self) -> PromptCacheStatistics:
        """See LoadedModel.prompt_cache: the slots' reuse and the host tier."""
        if self._decoder is not None:
            return self._decoder.prompt_cache()
        return PromptCacheStatistics(
            hits=self._hits, misses=self._misses, slot_tokens=self._reused_tokens
        )

    def progress(self) -> int:
        """See LoadedModel.progress: ``llama_decode`` calls (a prompt chunk or a token each)."""
        if self._decoder is not None:
            return self._decoder.steps
        return self._evaluated

    def memory_mb(self) -> int:
        """The file size plus the f16 KV cache estimate for the full context,
        plus the host tier's budget on a CPU host.

        llama.cpp's own numbers are not in the Python API (llama_state_get_size
        counts only the cells in use); compute buffers are not counted.
        """
        self._live()
        return -(-self._memory_bytes // MIB)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._live().tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        """See LoadedModel.render_chat.

        What the template does not take (``template_support``) is written as
        text first: system messages into the user turn, tools in Hermes form
        (see ``cortex.chat_template``).

        Raises:
          ChatTemplateMissing: no template in the file and no chat_format.
          InvalidRequest: the template failed on these messages.
        """
        self._live()
        if self._formatter is None:
            raise ChatTemplateMissing(
                f"model {self.model_id!r} has no chat template; set chat_format "
                f"(e.g. 'chatml', 'gemma', 'llama-3') in its catalogue entry"
            )
        messages, tools = adapt_chat(messages, tools, self.template_support)
        if self._object_arguments:
            messages = [_with_object_arguments(m) for m in messages]
        try:
            rendered = self._formatter(messages=messages, tools=tools)
        except Exception as exc:  # jinja errors and the template's raise_exception
            raise InvalidRequest(f"chat template of model {self.model_id!r}: {exc}")
        stop = rendered.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        # Templates such as llama-3's write the BOS themselves.
        add_bos = not (self._bos_text and rendered.prompt.startswith(self._bos_text))
        return ChatPrompt(
            text=rendered.prompt,
            stop=tuple(s for s in stop if s),
            add_bos=add_bos,
            special=True,
        )

    def generate(self, tokens: list[int], sampling: Sampling) -> CancellableTokens:
        """See LoadedModel.generate. Also ends when the context is full.

        Closing the iterator early leaves the context reusable: the next call
        re-evaluates only what differs from the tokens already in the KV cache.

        Cancellation: ``cancel()`` on the iterator (from any thread) ends it
        even while its prompt is evaluated: the prompt is evaluated in
        chunks of ``n_batch`` tokens and none is begun after a cancel.

        Raises (on the first ``next``):
          ContextOverflow: the prompt does not leave room for one token.
          InvalidRequest: an empty prompt, a token id outside the vocabulary,
            or a constraint that cannot be made a grammar.
        """
        cancellation = Cancellation()
        return CancellableTokens(
            self._generate(tokens, sampling, cancellation), cancellation.cancel
        )

    def _generate(
        self, tokens: list[int], sampling: Sampling, cancellation: Cancellation
    ) -> Iterator[Token]:
        llama = self._live()
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        n_vocab = llama.n_vocab()
        if not all(0 <= t < n_vocab for t in tokens):
            # Clients may send token ids (OpenAI completions); llama_decode
            # would reject them with a bare RuntimeError.
            raise InvalidRequest(f"token ids must be in [0, {n_vocab})", param="prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow.of(len(tokens), self.n_ctx, param="prompt")
        text = None if sampling.constraint is None else grammar_for(sampling.constraint)
        if self._decoder is not None:
            return (
                yield from self._decoder.generate(
                    tokens, sampling, self._piece, grammar=text, cancellation=cancellation
                )
            )
        grammar = None if text is None else self._grammar(text)
        # What Llama.generate will keep of its context (its own prefix match,
        # less the last prompt token it evaluates again for the logits).
        held = llama._input_ids[: llama.n_tokens].tolist()
        reused = min(common_prefix(held, tokens), len(tokens) - 1)
        self._reused_tokens += reused
        if reused:
            self._hits += 1
        else:
            self._misses += 1
        # The prompt a chunk at a time, so that a cancel stops it between
        # chunks: the chunks Llama.generate would evaluate (n_batch tokens
        # from the kept prefix on), so the output is the same. It then finds
        # the whole prompt cached and samples from its logits.
        keep = reused
        if keep and not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0  # recurrent state: a partial removal is not possible
        llama.n_tokens = keep
        for start in range(keep, len(tokens), llama.n_batch):
            if cancellation.is_cancelled():
                return
            llama.eval(tokens[start : start + llama.n_batch])
            self._evaluated += 1
        if cancellation.is_cancelled():
            return
        # The seed is sticky on the Llama object: reset it on every call.
        llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed)
        steps = llama.generate(
            tokens,
            temp=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            grammar=grammar,
            reset=True,
        )
        try:
            for n, token in enumerate(steps, start=1):
                self._evaluated += 1
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return
                yield Token(
                    id=token, piece=self._piece(token), cached_tokens=reused if n == 1 else 0
                )
                if len(tokens) + n >= self.n_ctx:
                    return
        finally:
            steps.close()

    def _grammar(self, text: str) -> llama_cpp.LlamaGrammar:
        # LlamaGrammar.from_string parses nothing, and a grammar llama.cpp
        # rejects becomes a NULL sampler that crashes the process: try it here.
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("the grammar does not parse as GBNF", param="grammar")
        llama_cpp.llama_sampler_free(sampler)
        return llama_cpp.LlamaGrammar.from_string(text, verbose=False)

    def unload(self) -> None:
        if self._llama is not None:
            llama, self._llama = self._llama, None
            if self._decoder is not None:
                self._decoder.close()
            llama.close()
