"""Engine plugins: the ``cortex.harness`` hook specification and its manager.

An engine ("harness") is a pluggy plugin registered under the
``cortex.harness`` entry-point group, exactly like a third party's: the
built-in llama.cpp and ctransformers engines are separate distributions
under ``plugins/``. Hooks are plain synchronous factories (pluggy does not
await); the neuron calls the blocking ones in a worker thread.

The object a load returns is a :class:`LoadedModel`. The neuron drives it:
one generation worker per loaded model owns it and calls its methods from a
worker thread under the model's ``CapacityLimiter``.
"""

from __future__ import annotations

import abc
import array
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import pluggy

NAME = "cortex.harness"

hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)


@attrs.frozen
class HarnessInfo:
    """What an engine says about itself; feeds the neuron's ``/discovery``."""

    name: str
    version: str
    formats: tuple[str, ...]
    cuda: bool = False


@attrs.frozen
class Placement:
    """Where a model goes: which devices, and how much host memory it may use.

    ``devices`` are NVML indices; empty means CPU only.
    """

    devices: tuple[int, ...] = ()
    memory_budget_mb: int | None = None


@attrs.frozen
class LoadSpec:
    """A request to load one model file.

    Attributes:
      model_id: the id clients use ("Qwen/Qwen3-8B"); may contain slashes.
      path: the resolved model file.
      harness: the engine to use, or None for the first that can read the file.
      chat_format: a named chat format to use when the file has no template.
      options: engine-specific settings (n_ctx, n_threads, n_gpu_layers, ...).
    """

    model_id: str
    path: str
    harness: str | None = None
    chat_format: str | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class JsonSchema:
    """Constrains the output to one JSON value that matches ``schema``.

    ``schema`` is a JSON schema as the client gave it (OpenAI
    ``response_format`` json_schema); None asks for any JSON object
    (``json_object``).
    """

    schema: Mapping[str, Any] | None = None
    #: The request field a refusal names.
    param: str = "response_format"


@attrs.frozen
class ToolCalls:
    """Constrains the output to tool calls, and nothing else.

    The calls are written in ``family``'s markup (``cortex.toolcalls``: the
    neuron parses them with ``ToolCallParser(family)``), each to one of
    ``functions`` with arguments that follow its ``parameters`` schema where
    the engine can enforce that.

    Attributes:
      family: one of ``cortex.toolcalls.FAMILIES``; the model's
        ``tool_format``, or the neuron's default when it has none.
      functions: OpenAI ``tool.function`` objects (name, description,
        parameters); never empty.
      parallel: whether several calls may follow each other; False asks for
        exactly one.
    """

    family: str
    functions: tuple[Mapping[str, Any], ...]
    parallel: bool = True
    #: The request field a refusal names.
    param: str = "tool_choice"
    #: The request field of each function's ``parameters``, in order, for a
    #: refusal of that schema; empty: ``param`` stands for them all.
    parameters: tuple[str, ...] = ()


#: What the output must look like: engine-neutral, each engine enforces it
#: its own way (llama.cpp with a grammar) or refuses it.
OutputConstraint = JsonSchema | ToolCalls


@attrs.frozen
class Sampling:
    """Sampling settings for one generation; None means the engine default."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    #: The shape the output must have, or None. An engine that cannot
    #: enforce it raises ``InvalidRequest`` before the first token.
    constraint: OutputConstraint | None = None


@attrs.frozen
class ChatPrompt:
    """A chat conversation rendered to the model's prompt text.

    ``stop`` lists end-of-turn strings the template implies (e.g.
    ``<end_of_turn>``); generation stops on them and they never reach the
    client. ``special`` says whether the prompt contains control tokens
    written as text that must be tokenized as such.
    """

    text: str
    stop: tuple[str, ...] = ()
    add_bos: bool = True
    special: bool = True


@attrs.frozen
class Token:
    """One generated token: its id and the bytes it adds to the text.

    ``cached_tokens`` is set on the first token of a generation by engines
    that keep a prompt cache: how many of the prompt's tokens were not
    evaluated again because their KV state was reused. It is 0 on the other
    tokens, and everywhere from engines that do not say. It does not take
    part in comparisons: the same token is the same token, cached or not.
    """

    id: int
    piece: bytes
    cached_tokens: int = attrs.field(default=0, eq=False)


#: The tokens in one block of ``prefix_hashes``.
BLOCK_TOKENS = 256


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The number of leading items ``a`` and ``b`` share (tokens, block hashes)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_hashes(tokens: Sequence[int], *, block: int = BLOCK_TOKENS) -> list[str]:
    """Chained hashes of the whole ``block``-token blocks at the start of ``tokens``.

    Hash ``i`` is BLAKE2b (8 bytes, hex) of hash ``i - 1``'s 8 bytes (none
    for the first) followed by block ``i``'s token ids as little-endian
    uint32. It so names the whole prefix up to the end of its block: two
    prompts share hash ``i`` exactly when their first ``(i + 1) * block``
    tokens are the same. A partial last block has no hash.
    """
    out: list[str] = []
    previous = b""
    for start in range(0, len(tokens) - block + 1, block):
        ids = array.array("I", tokens[start : start + block])
        if sys.byteorder != "little":
            ids.byteswap()
        digest = hashlib.blake2b(previous + ids.tobytes(), digest_size=8).digest()
        out.append(digest.hex())
        previous = digest
    return out


@attrs.frozen
class PromptCacheStatistics:
    """What an engine's prompt cache holds and how it has served, for metrics.

    Counters run from the load. A request is a hit when it reused at least
    one cached prompt token, from either tier.

    Attributes:
      hits: requests that reused cached prompt tokens.
      misses: requests that reused none.
      slot_tokens: prompt tokens reused from the KV cells a slot still held.
      host_tokens: prompt tokens reused from states restored from host memory.
      host_saves: sequence states copied to host memory.
      host_restores: saved states copied back into a slot.
      host_failures: restores the engine gave up (the prompt was then
        evaluated as if nothing were saved).
      host_evictions: saved states dropped for room (least recently used first).
      host_bytes: bytes the saved states hold now.
      host_entries: saved states held now.
      host_budget_bytes: the most bytes the saved states may hold; 0 when
        the engine has no host tier.
      block_tokens: the block size of ``blocks``.
      blocks: ``prefix_hashes`` of the prefixes the cache holds (slots and
        host tier), most recently used first, deduplicated, capped; a router
        can tell how much of a prompt a model has cached from the longest
        run of the prompt's own hashes found here.
    """

    hits: int = 0
    misses: int = 0
    slot_tokens: int = 0
    host_tokens: int = 0
    host_saves: int = 0
    host_restores: int = 0
    host_failures: int = 0
    host_evictions: int = 0
    host_bytes: int = 0
    host_entries: int = 0
    host_budget_bytes: int = 0
    block_tokens: int = BLOCK_TOKENS
    blocks: tuple[str, ...] = ()


class CancellableTokens(Iterator[Token]):
    """The tokens of one ``LoadedModel.generate`` call with the ``cancel()``
    it may offer: ``tokens`` (a generator, closed with this) and the
    callable that ends it soon, from any thread, even while a ``next()``
    is blocked in its prompt."""

    def __init__(self, tokens: Iterator[Token], cancel: Callable[[], None]) -> None:
        self._tokens = tokens
        self._cancel = cancel

    def __next__(self) -> Token:
        return next(self._tokens)

    def close(self) -> None:
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()

    def cancel(self) -> None:
        """End the generation soon, even during its prompt; any thread, any time."""
        self._cancel()


class LoadedModel(abc.ABC):
    """A model an engine has loaded. All methods block; call them in a thread.

    The neuron owns stop strings, token limits, UTF-8 assembly and
    cancellation; the engine only turns tokens into more tokens.
    """

    model_id: str
    harness: str
    #: The context length the model was loaded with.
    n_ctx: int
    #: The context length the model was trained with, when known.
    n_ctx_train: int | None = None
    #: The markup the model writes tool calls in ("hermes", "llama3",
    #: "mistral"; see ``cortex.toolcalls``), or None when the engine cannot
    #: tell: the neuron then assumes "hermes".
    tool_format: str | None = None
    #: How many ``generate`` calls may run at once, each from its own thread.
    #: Above 1 the engine batches them (several sequences per decode step);
    #: ``n_ctx`` is then the context of each one.
    parallel: int = 1
    #: How the KV cache is laid out across those sequences, for operators:
    #: "unified" (one pool they share) or "per-slot" (``n_ctx`` cells each);
    #: None when the engine does not say.
    kv_layout: str | None = None

    @abc.abstractmethod
    def memory_mb(self) -> int:
        """Memory the loaded model uses (weights plus context), in MiB."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Turn text into token ids."""

    @abc.abstractmethod
    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        """Render OpenAI-shaped chat messages through the model's chat template.

        Raises:
          ChatTemplateMissing: the file has no template and no chat_format was given.
        """

    def render_prefilled(
        self,
        messages: list[dict[str, Any]],
        prefill: str,
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatPrompt:
        """Render a conversation whose assistant answer has begun with ``prefill``.

        ``messages`` are the turns before the assistant turn to continue and
        ``prefill`` that turn's text: the answer is generated after it, with
        no end of turn between them. By default the conversation is rendered
        with the generation prompt (:meth:`render_chat`) and ``prefill``
        written after it as it is; an engine whose format writes an
        assistant turn's text differently (a space before it, say) may
        override this.

        Raises:
          As :meth:`render_chat`.
        """
        prompt = self.render_chat(messages, tools=tools)
        return attrs.evolve(prompt, text=prompt.text + prefill)

    @abc.abstractmethod
    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        """Yield generated tokens one by one after the prompt ``tokens``.

        The iterator ends at the model's end of generation or when the
        context is full; the caller stops consuming at its own limits and
        then closes the iterator. Up to ``parallel`` generations run at a
        time per model, each in its own thread; closing one ends just that
        one. ``tokenize`` and ``render_chat`` may run concurrently with them.

        Cancellation: the iterator may also have a ``cancel()`` method (see
        :class:`CancellableTokens`), which
        the neuron calls from another thread when the client leaves, while a
        ``next()`` may be blocked (evaluating the prompt, say). The
        iterator should then end soon: between two chunks of its prompt,
        not after the whole of it.
        """

    def prompt_cache(self) -> PromptCacheStatistics | None:
        """The prompt cache's statistics; None when the engine keeps none.

        Called from the neuron's event loop (``GET /models``, ``/metrics``):
        it must not block for long.
        """
        return None

    def progress(self) -> int | None:
        """A count that grows whenever the engine does work; None when it cannot tell.

        Any unit will do (the llama.cpp engine counts its ``llama_decode``
        calls); what matters is that it moves while a generation is being
        worked on, including while a long prompt is evaluated (in chunks,
        each one counted). The neuron reports how long a model with
        requests running has gone without it moving, and gateways stop
        routing to a model stalled too long (a hung GPU kernel, a
        deadlocked decode thread). None (the default) reports nothing, and
        the model is never judged stalled.

        Called from the neuron's event loop (``GET /models``): it must not
        block, so read a counter, never wait for a lock the decode loop holds.
        """
        return None

    @abc.abstractmethod
    def unload(self) -> None:
        """Free everything the model holds. The object is unusable afterwards."""


class HarnessSpec:
    """The hooks an engine plugin implements."""

    @hookspec
    def cortex_harness_info(self) -> HarnessInfo:
        """Called for ``/discovery`` and at start. Every engine answers."""
        raise NotImplementedError

    @hookspec(firstresult=True)
    def cortex_harness_load(self, spec: LoadSpec, placement: Placement) -> LoadedModel | None:
        """Load ``spec`` if this engine should handle it.

        Called in a worker thread (it blocks for as long as the load takes).
        Return None when ``spec.harness`` names another engine, or when it
        names none and this engine cannot read the file; the first non-None
        result wins. Raise ``ModelLoadError`` when this engine should load the
        file but cannot.
        """
        raise NotImplementedError

    @hookspec(firstresult=True)
    def cortex_harness_need_mb(self, spec: LoadSpec, placement: Placement) -> int | None:
        """The least memory budget (MiB) in which this engine would load ``spec``.

        Called in a worker thread before ``cortex_harness_load`` on a host
        without GPUs, where the neuron refuses a load that does not fit what
        is free before it asks an engine to load it. Answer without loading
        the weights: the weights and the least context the options accept,
        with whatever else the load keeps beside them. The neuron's refusal
        says that figure, and a gateway unloads others to make that much room
        and asks again, so it must be enough for the load to succeed.

        Return None when the load is not this engine's (as for
        ``cortex_harness_load``) or it cannot tell: the neuron then counts the
        file's size alone. Raise as ``cortex_harness_load`` would where the
        load is this engine's and cannot succeed (a damaged file, a bad option).
        """
        raise NotImplementedError


def plugin_manager(
    *, blocked: Iterable[str] = (), plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """Build the plugin manager: built-ins first, then entry points.

    Args:
      blocked: plugin (entry point) names that must not be loaded.
      plugins: extra plugin objects to register (tests, embedding).
    """
    pm = pluggy.PluginManager(NAME)
    pm.add_hookspecs(HarnessSpec)
    for name in blocked:
        pm.set_blocked(name)
    for plugin in plugins:
        pm.register(plugin)
    pm.load_setuptools_entrypoints(NAME)
    pm.check_pending()
    return pm


def harness_infos(pm: pluggy.PluginManager) -> list[HarnessInfo]:
    return list(pm.hook.cortex_harness_info())
