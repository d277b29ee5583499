"""Session affinity: send a request to the replica most likely to hold its prefix.

A neuron reuses the KV cells of a prompt's longest cached prefix (its slots,
then its host tier): the next turn of a conversation sent where the last one
went skips most of its prompt processing. The router learns where it sent
what, per model, and tells the predictive policy how much prompt each
replica is expected to hold:

- a **session key**, when the client sends one: Claude Code's
  ``x-claude-code-session-id`` header or the ``session_id`` inside its
  ``metadata.user_id`` (any other ``metadata.user_id`` as it is), OpenAI's
  ``prompt_cache_key``, else its ``user``. The replica a session was last
  sent to is taken to hold as much of the new prompt as the last one sent;
- a **prefix index** for every request: the rendered request (what the
  neuron is sent, from its ``messages`` / ``input`` / ``prompt`` on) cut into
  ``BLOCK_BYTES`` blocks, each named by a hash of everything up to its end,
  the first ``MAX_BLOCKS`` of them. A replica holds a prompt's first ``k``
  blocks when a request whose ``k``-th hash was the same went there. This
  keeps a conversation on one replica without any key, and sends a new
  session where a shared system prompt is cached already;
- a **conversation** for a request without a key (``conversations``): it
  continues the one whose last prompt's first ``least_shared`` blocks it
  holds (the rule ``scheduler.FollowUps`` matches a follow-up to its answer
  by), else starts one, numbered here (an ``int``, never taken for a
  client's key). It gets a keyed session's bookkeeping and use: its
  replica, taken to hold as much of the new prompt as the last one sent
  (more than the blocks the prefix index shares: the bytes after the
  messages changed), last turn, turn gaps, and its cache's weight
  (``eviction_cost``).

All are bounded LRU maps (``MAX_SESSIONS`` for sessions and conversations
together, ``MAX_BLOCK_ENTRIES``),
remembered when a request is routed. Folded into the predicted time to first
token (``fold``) as the prompt processing each option still has to do, the
expected saving competes with queues and cold loads. A replica processes
the prompts sent to it one after another, so the prompt processing of its
requests that have not answered yet (``pending``: what each was expected
not to find cached there, until its first byte) comes before a new
request's own: new sessions spread over the replicas rather than queue
behind each other's prefills on the first one. A replica keeps its
sessions while it has a free slot ("sticky until saturated", llm-d's
rule); once it is saturated (requests in flight reach its ``parallel``
slots) a request waits for a slot there when that is predicted to take
under half the time of processing the prompt elsewhere
(``PredictivePolicy.choose``, ``HOME_WAIT_SHARE``), else it goes to the
next best replica and the affinity counts as broken.

Unloading a model throws its prompt cache away. ``eviction_cost`` is what
that costs, in seconds of prompt processing: every session (keyed, or a
keyless conversation) last sent to that replica, its last prompt's tokens
re-prefilled when it comes back, weighed by the chance it does
(``exp(-idle / scale)``, ``scale`` three of the model's usual gaps between
a session's turns, at least ``SESSION_SCALE_FLOOR`` and at most the
predictor's horizon; sessions idle longer than the horizon count
for nothing). The predictor adds it to an eviction's penalty (in full, even
where another replica holds the model: the sessions re-prefill wherever they
go) and the predictive policy to its victim order, so ordinary traffic
evicts a model whose agents are between turns last; a request that can only
be served by such an eviction waits up to that many seconds for something
cheaper to free (``Option.hold``). A model whose engine keeps no prompt
cache (no ``prompt_cache`` in its status) has none to lose; ``[routing]
weigh_caches = false`` counts none. A session whose answer called a tool,
its result not sent yet (``scheduler.FollowUps``), is certain to come back:
its prompt counts in full, and so does a prompt without a session key
whose follow-up is expected (once: its conversation's weight is replaced).

Prompt tokens are turned into seconds at the prefill rate measured where
the request went (``Observations.prefill_tps``: the tokens a request routed
to a free slot was expected to process, over its time to first token), else
measured elsewhere, else ``PREFILL_OVER_DECODE`` times the decode rate. A
replica's slot wait counts the prompt processing still to do there, as a
new replica's load counts the whole prompt (``Option.prefill``).

The neurons' own ``prompt_cache.blocks`` hash token ids; matching them would
cost a tokenizer call per request and candidate, so the gateway keeps its
own byte-level index instead.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.scheduler import (
    PRIOR_DECODE,
    Ewma,
    FollowUp,
    Option,
    Predictor,
    least_shared,
)
from cortex.gateway.state import NeuronState

#: Bytes in one block of the prefix index.
BLOCK_BYTES = 2048
#: Blocks of a request indexed: its first 512 KiB (Claude Code's system
#: prompt is about 30 KiB, its tools follow the messages).
MAX_BLOCKS = 256
#: (model, block hash) entries kept, least recently used dropped first.
MAX_BLOCK_ENTRIES = 65536
#: (model, session) entries kept, least recently used dropped first.
MAX_SESSIONS = 16384
#: Rendered request bytes per prompt token (JSON of English text and code).
BYTES_PER_TOKEN = 4.0
#: Prompt processing is this many times faster than decoding, per token.
PREFILL_OVER_DECODE = 10.0
#: Seconds over which a session's chance of another turn decays, at least
#: (until its model's gaps between turns are measured: this).
SESSION_SCALE_FLOOR = 30.0
#: Where the prompt starts in a request body: everything before (the model,
#: sampling settings) may change from turn to turn.
_ANCHORS = (b'"messages"', b'"instructions"', b'"input"', b'"prompt"')
#: The value a next turn repeats and adds to: a chat's ``messages``, a
#: Responses ``input``, a completion's ``prompt``.
_MESSAGES = re.compile(rb'"(?:messages|input|prompt)"\s*:\s*')
_DECODER = json.JSONDecoder()
#: The ``result`` labels of ``cortex_affinity_total``.
RESULTS = ("kept", "broken", "new")
#: Claude Code's session header.
SESSION_HEADER = b"x-claude-code-session-id"

#: What the affinity knows a session by: the client's key, or the number it
#: gave a conversation that sends none (never a client's: an ``int``).
Session = str | int


@attrs.frozen
class Prompt:
    """What the router knows of one request's prompt."""

    #: The client's session key, if it sent one.
    session: str | None
    #: Hashes of the rendered prompt's whole blocks, in order.
    blocks: tuple[bytes, ...]
    #: Bytes of the rendered prompt.
    size: int
    #: Of ``blocks``, those wholly inside the messages (before the value's
    #: closing bracket), found for a prompt without a session key. None:
    #: not found (not JSON, or not looked for).
    messages: int | None = None

    @property
    def repeated(self) -> int:
        """Leading blocks the next turn of its conversation is expected to repeat.

        A next turn repeats the messages and adds to them, but what follows
        them in a body (a chat body's ``tools``, settings) may change: the
        blocks inside the messages where they are known and some are whole,
        else ``least_shared`` (the share ``FollowUps`` falls back on).
        """
        if self.messages:
            return self.messages
        return least_shared(len(self.blocks))


def session_key(header: str | None, body: Mapping[str, Any]) -> str | None:
    """The request's session key: the header, then the body's (None: none sent).

    ``body`` is the client's own: Anthropic's ``metadata.user_id`` (its
    ``session_id`` when it is Claude Code's JSON), OpenAI's
    ``prompt_cache_key`` or ``user``.
    """
    if header:
        return header
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        if user_id.startswith("{"):
            try:
                found = json.loads(user_id).get("session_id")
            except (ValueError, AttributeError):
                found = None
            if isinstance(found, str) and found:
                return found
        return user_id
    for key in ("prompt_cache_key", "user"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def prompt_of(content: bytes, session: str | None) -> Prompt:
    """The prompt of a request whose (rendered) body is ``content``.

    Without a session key, where its messages end too (``Prompt.messages``):
    its conversation is recognised by them (``Affinity.conversation``).
    """
    found = [at for at in (content.find(a) for a in _ANCHORS) if at >= 0]
    view = memoryview(content)[min(found, default=0) :]
    hasher = hashlib.blake2b(digest_size=8)
    blocks = []
    for start in range(0, min(len(view), BLOCK_BYTES * MAX_BLOCKS) - BLOCK_BYTES + 1, BLOCK_BYTES):
        hasher.update(view[start : start + BLOCK_BYTES])
        blocks.append(hasher.copy().digest())
    messages = _messages_blocks(view, len(blocks)) if session is None and blocks else None
    return Prompt(session=session, blocks=tuple(blocks), size=len(view), messages=messages)


def _messages_blocks(view: memoryview, blocks: int) -> int | None:
    """Of the ``blocks`` indexed of ``view``, those wholly inside its messages (None: unknown).

    Parsed only as far as the blocks go (latin-1 keeps byte offsets: JSON's
    syntax is ASCII); messages that run past them hold them all.
    """
    window = bytes(view[: BLOCK_BYTES * MAX_BLOCKS])
    found = _MESSAGES.search(window)
    if found is None:
        return None
    try:
        _, end = _DECODER.raw_decode(window.decode("latin-1"), found.end())
    except ValueError:
        return blocks if len(view) > len(window) else None
    # The closing bracket is where the next turn goes on instead.
    return min((end - 1) // BLOCK_BYTES, blocks)


@attrs.frozen
class AffinityStatistics:
    #: Sessions remembered, keyless conversations (``conversations``) included.
    sessions: int
    conversations: int
    blocks: int
    kept: int
    broken: int
    new: int


@attrs.define(eq=False)
class Affinity:
    """Where this gateway sent each session and prefix, per model (bounded LRU maps)."""

    predictor: Predictor
    metrics: GatewayMetrics
    #: ``[routing] affinity``: False, ``fold`` leaves the predictions as they
    #: are; routes are still remembered and counted kept / broken / new.
    enabled: bool = True
    #: ``[routing] weigh_caches``: False, ``eviction_cost`` is 0.
    weigh_caches: bool = True
    #: ``[routing] conversations``: False, a prompt without a session key
    #: is known by the prefix index alone (no session, nothing weighed).
    conversations: bool = True
    #: (model, session) -> (neuron, prompt bytes it was sent, when: the fleet clock).
    _sessions: collections.OrderedDict[tuple[str, Session], tuple[str, int, float]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    #: (neuron, model) -> the sessions last sent there (the keys of ``_sessions``).
    _placed: dict[tuple[str, str], set[Session]] = attrs.field(factory=dict, init=False)
    #: (model, block hash) -> the keyless conversation whose last prompt's
    #: ``least_shared`` leading blocks end with that block: a prompt holding
    #: it continues that conversation (the newest, where two have one).
    _marks: dict[tuple[str, bytes], int] = attrs.field(factory=dict, init=False)
    #: keyless conversation -> its entry in ``_marks``.
    _marked: dict[int, tuple[str, bytes]] = attrs.field(factory=dict, init=False)
    _numbers: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    #: model -> seconds between two turns of one of its sessions.
    _turn_gap: dict[str, Ewma] = attrs.field(factory=dict, init=False)
    #: (model, block hash) -> the neurons sent that prefix, most recent last.
    _blocks: collections.OrderedDict[tuple[str, bytes], dict[str, None]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _counts: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    #: (neuron, model) -> the requests sent there with no answer yet, each
    #: with the prompt tokens it was expected to process there.
    _pending: dict[tuple[str, str], list[tuple[Prompt, float]]] = attrs.field(
        factory=dict, init=False
    )

    def __attrs_post_init__(self) -> None:
        for result in RESULTS:
            self.metrics.affinity.labels(result)

    def cached(self, model_id: str, prompt: Prompt) -> dict[str, int]:
        """Neuron -> bytes of ``prompt`` it is expected to hold (only neurons with some)."""
        held: dict[str, int] = {}
        for depth, block in enumerate(prompt.blocks, 1):
            neurons = self._blocks.get((model_id, block))
            if neurons is None:
                break
            self._blocks.move_to_end((model_id, block))
            for name in neurons:
                held[name] = depth * BLOCK_BYTES
        session = self._session_of(model_id, prompt)
        if session is not None:
            found = self._sessions.get((model_id, session))
            if found is not None:
                name, size, _ = found
                held[name] = max(held.get(name, 0), min(size, prompt.size))
        return held

    def remembered(
        self, model_id: str, prompt: Prompt, held: dict[str, int] | None = None
    ) -> set[str]:
        """The replicas the request has affinity to: its session's, else the longest prefix's.

        ``held``: ``cached(model_id, prompt)``, where the caller has it already.
        """
        session = self._session_of(model_id, prompt)
        if session is not None:
            found = self._sessions.get((model_id, session))
            if found is not None:
                return {found[0]}
        if held is None:
            held = self.cached(model_id, prompt)
        best = max(held.values(), default=0)
        return {name for name, size in held.items() if size == best and best > 0}

    def prefill(self, option: Option, model_id: str, tokens: float) -> float:
        """Seconds ``option``'s neuron takes to process ``tokens`` prompt tokens."""
        return self.prefill_seconds(option.neuron, model_id, tokens)

    def prefill_seconds(self, neuron: NeuronState, model_id: str, tokens: float) -> float:
        """Seconds ``neuron`` takes to process ``tokens`` prompt tokens of ``model_id``.

        At the prefill rate measured there (``Observations.prefill_tps``),
        else the mean of the rates measured elsewhere, else
        ``PREFILL_OVER_DECODE`` times its decode rate.
        """
        observations = self.predictor.observations
        rate = observations.prefill_tps(neuron.name, model_id)
        if rate is None:
            elsewhere = [
                found
                for name, m in observations.prefill_tokens
                if m == model_id and (found := observations.prefill_tps(name, m)) is not None
            ]
            rate = sum(elsewhere) / len(elsewhere) if elsewhere else None
        if rate is not None:
            return tokens / rate
        speeds = observations.decode_tps
        measured = speeds.get((neuron.name, model_id))
        if measured is not None and measured.value:
            decode = measured.value
        else:
            # A neuron not measured yet gets what the others do with this
            # model, not a prior: a prior slower than the measured ones would
            # keep every request away from the neuron it is meant for.
            known = [v.value for (_, m), v in speeds.items() if m == model_id and v.value]
            if known:
                decode = sum(known) / len(known)
            else:
                decode = min(500.0, max(2.0, PRIOR_DECODE / max(self.predictor.size(model_id), 1)))
        return tokens / (decode * PREFILL_OVER_DECODE)

    def fold(self, model_id: str, prompt: Prompt | None, options: list[Option]) -> list[Option]:
        """``options`` with the prompt processing each still needs added to its prediction.

        A loaded replica expected to hold part of the prompt processes only
        the rest, after the prompts of its requests not answered yet; a load
        or a replica without it, all of it.
        """
        if prompt is None or not options or not self.enabled:
            return options
        held = self.cached(model_id, prompt)
        folded = []
        for option in options:
            tokens = prompt.size / BYTES_PER_TOKEN
            pending = 0.0
            if option.kind == "loaded":
                name = option.neuron.name
                tokens = max(prompt.size - held.get(name, 0), 0) / BYTES_PER_TOKEN
                pending = self.pending(name, model_id)
            prefill = self.prefill(option, model_id, tokens)
            # The prompts sent there before this one come first.
            ahead = self.prefill(option, model_id, pending) if pending else 0.0
            folded.append(
                attrs.evolve(option, predicted=option.predicted + ahead + prefill, prefill=prefill)
            )
        return folded

    def uncached_tokens(self, model_id: str, prompt: Prompt | None, neuron: str) -> float:
        """Tokens of ``prompt`` that ``neuron`` is expected to process (not cached there)."""
        if prompt is None:
            return 0.0
        held = self.cached(model_id, prompt).get(neuron, 0)
        return max(prompt.size - held, 0) / BYTES_PER_TOKEN

    def pending(self, neuron: str, model_id: str) -> float:
        """Prompt tokens ``neuron`` is expected to process for requests it has not answered."""
        return sum(tokens for _, tokens in self._pending.get((neuron, model_id), ()))

    def answered(self, neuron: str, model_id: str, prompt: Prompt | None) -> None:
        """``neuron`` sent the first byte of the answer to ``prompt`` (or gave up on it).

        Its prompt is processed: it no longer delays others there. Safe to
        call more than once for a request.
        """
        entries = self._pending.get((neuron, model_id))
        if prompt is None or not entries:
            return
        for at, (sent, _) in enumerate(entries):
            if sent is prompt:
                del entries[at]
                break
        if not entries:
            del self._pending[(neuron, model_id)]

    def routed(self, model_id: str, prompt: Prompt | None, neuron: str) -> None:
        """``prompt`` goes to ``neuron``: count kept / broken / new, and remember it."""
        if prompt is None:
            return
        cached = self.cached(model_id, prompt)
        remembered = self.remembered(model_id, prompt, cached)
        result = "new" if not remembered else "kept" if neuron in remembered else "broken"
        held = cached.get(neuron, 0)
        self._pending.setdefault((neuron, model_id), []).append(
            (prompt, max(prompt.size - held, 0) / BYTES_PER_TOKEN)
        )
        self._counts[result] += 1
        self.metrics.affinity.labels(result).inc()
        session = prompt.session
        if session is None and prompt.blocks and self.conversations:
            session = self.conversation(model_id, prompt.blocks)
            if session is None:
                session = next(self._numbers)
            self._mark(model_id, session, prompt)
        if session is not None:
            key = (model_id, session)
            now = self.predictor.state.clock()
            last = self._sessions.get(key)
            if last is not None:
                self._unplace(last[0], *key)
                gap = self._turn_gap.setdefault(model_id, Ewma())
                gap.add(max(now - last[2], 0.0))
            self._sessions[key] = (neuron, prompt.size, now)
            self._sessions.move_to_end(key)
            self._placed.setdefault((neuron, model_id), set()).add(session)
            while len(self._sessions) > MAX_SESSIONS:
                (old_model, old_session), (old_neuron, _, _) = self._sessions.popitem(last=False)
                self._unplace(old_neuron, old_model, old_session)
                self._unmark(old_session)
        for block in prompt.blocks:
            entry = (model_id, block)
            neurons = self._blocks.get(entry)
            if neurons is None:
                neurons = self._blocks[entry] = {}
            else:
                self._blocks.move_to_end(entry)
            neurons.pop(neuron, None)
            neurons[neuron] = None
        while len(self._blocks) > MAX_BLOCK_ENTRIES:
            self._blocks.popitem(last=False)

    def _session_of(self, model_id: str, prompt: Prompt) -> Session | None:
        if prompt.session is not None or not (self.conversations and prompt.blocks):
            return prompt.session
        return self.conversation(model_id, prompt.blocks)

    def conversation(self, model_id: str, blocks: Sequence[bytes]) -> int | None:
        """The keyless conversation a prompt of ``blocks`` continues (None: a new one).

        The one whose last prompt's ``Prompt.repeated`` leading blocks it
        holds (the rule ``FollowUps`` matches a follow-up by): a next turn
        repeats the last one's messages and adds to them, while what follows
        them in a body (a chat body's ``tools``, settings) may change.
        Sessions of one kind share their system prompt, but their messages
        differ after it: within a block of its end, they are one. The one
        whose mark is deepest wins; at most ``MAX_BLOCKS`` lookups.
        """
        for block in reversed(blocks):
            found = self._marks.get((model_id, block))
            if found is not None:
                return found
        return None

    def _mark(self, model_id: str, session: int, prompt: Prompt) -> None:
        self._unmark(session)
        mark = (model_id, prompt.blocks[prompt.repeated - 1])
        self._marks[mark] = session
        self._marked[session] = mark

    def _unmark(self, session: Session) -> None:
        if isinstance(session, int):
            mark = self._marked.pop(session, None)
            if mark is not None and self._marks.get(mark) == session:
                del self._marks[mark]

    def _unplace(self, neuron: str, model_id: str, session: Session) -> None:
        placed = self._placed.get((neuron, model_id))
        if placed is not None:
            placed.discard(session)
            if not placed:
                del self._placed[(neuron, model_id)]

    def eviction_cost(
        self,
        neuron: NeuronState,
        model_id: str,
        expected: Sequence[FollowUp] = (),
    ) -> float:
        """Expected seconds of prompt processing that unloading ``model_id`` from ``neuron`` costs.

        The sum over the sessions last sent there, keyed or keyless
        conversations alike, of their last prompt's tokens, each weighed by
        the chance the session comes back (``exp(-idle / scale)``, ``scale``
        three of the model's turn gaps, at least ``SESSION_SCALE_FLOOR``;
        none past the predictor's horizon), at the neuron's prefill rate.
        ``expected``: the follow-ups expected there (``scheduler.FollowUps``):
        certain to come back, their prompts count in full, once: a keyed
        one's session, a keyless one's conversation (found by its prompt's
        blocks) is not weighed again. 0 with affinity off (routes do not
        count on where sessions are), with ``weigh_caches`` off, and for a
        model that reports no prompt cache.
        """
        placed = self._placed.get((neuron.name, model_id)) or set()
        status = neuron.models.get(model_id)
        if not (self.enabled and self.weigh_caches and (placed or expected)):
            return 0.0
        if status is None or status.prompt_cache is None:
            return 0.0
        tokens = 0.0
        certain: set[Session] = set()
        for follow_up in expected:
            session: Session | None = follow_up.session
            if session is None and follow_up.blocks:
                session = self.conversation(model_id, follow_up.blocks)
            if session is not None and session in placed:
                certain.add(session)
            else:
                tokens += follow_up.size / BYTES_PER_TOKEN
        horizon = self.predictor.horizon
        gap = self._turn_gap.get(model_id)
        scale = SESSION_SCALE_FLOOR
        if gap is not None and gap.value is not None:
            scale = min(max(3.0 * gap.value, SESSION_SCALE_FLOOR), horizon)
        now = self.predictor.state.clock()
        for held in placed:
            _, size, seen = self._sessions[(model_id, held)]
            idle = max(now - seen, 0.0)
            if held in certain:
                tokens += size / BYTES_PER_TOKEN
            elif idle < horizon:
                tokens += size / BYTES_PER_TOKEN * math.exp(-idle / scale)
        return self.prefill_seconds(neuron, model_id, tokens) if tokens else 0.0

    def forget(self, neuron: str, model_id: str) -> None:
        """``model_id`` left ``neuron`` (unloaded, evicted): it holds none of its prefixes."""
        self._pending.pop((neuron, model_id), None)
        for session in self._placed.pop((neuron, model_id), ()):
            del self._sessions[(model_id, session)]
            self._unmark(session)
        for key in [k for k in self._blocks if k[0] == model_id]:
            neurons = self._blocks[key]
            neurons.pop(neuron, None)
            if not neurons:
                del self._blocks[key]

    def statistics(self) -> AffinityStatistics:
        return AffinityStatistics(
            sessions=len(self._sessions),
            conversations=len(self._marked),
            blocks=len(self._blocks),
            kept=self._counts["kept"],
            broken=self._counts["broken"],
            new=self._counts["new"],
        )
