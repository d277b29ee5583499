"""Prompts as token runs, and a fake neuron's prompt cache: slots and a host tier.

A simulated prompt is a sequence of **runs**, ``(name, tokens)``: the token
ids of run ``name`` are the same wherever it appears (a shared system
prompt, a session's opening document, the answer of its third turn), so two
prompts share a prefix exactly as far as their runs agree, and a run cut
short shares its first tokens with the whole one. Ids and bytes come from
SHAKE-256 of the name, four bytes a token: the same bytes make the request
body the gateway's affinity hashes (``render``) and, as uint32, the token
ids the neuron's ``prefix_hashes`` name its cache by.

:class:`PromptCache` acts out the llama.cpp engine's cache
(``cortex_llamacpp.batched``) for one loaded model: ``parallel`` slots, each
keeping the tokens of its last sequence (prompt and answer), and a host
tier, a least-recently-used list of saved sequences within a byte budget
(``host_cache_mb``). Seating a prompt follows the engine's rules: the free
slot sharing the longest prefix (at least ``MIN_TOKENS``, else an empty
slot, else the least recently used); a saved state that shares at least
``MIN_TOKENS`` more is restored instead; a slot's tokens are saved before
they go, unless short or saved already; a saved state that a newer one
extends is dropped. Not modelled: the shared KV pool's cell limit (each
slot keeps its whole sequence), restore failures, sliding windows.
"""

from __future__ import annotations

import array
import collections
import functools
import hashlib
import sys
from collections.abc import Sequence

import attrs

from cortex.harness import BLOCK_TOKENS, PromptCacheStatistics, prefix_hashes

#: Bytes a token takes in a rendered request (the gateway's affinity
#: assumes four: ``cortex.gateway.affinity.BYTES_PER_TOKEN``).
TOKEN_BYTES = 4
#: Tokens a cached prefix must share to count, and a slot to be saved (the
#: engine's ``MIN_TOKENS``).
MIN_TOKENS = 64
#: Block hashes a model reports (the engine's ``MAX_BLOCKS``).
MAX_BLOCKS = 256

Run = tuple[str, int]
Runs = tuple[Run, ...]


def length(runs: Sequence[Run]) -> int:
    return sum(n for _, n in runs)


def shared(a: Sequence[Run], b: Sequence[Run]) -> int:
    """Tokens at the start of ``a`` and ``b`` that are the same."""
    total = 0
    for (name_a, n_a), (name_b, n_b) in zip(a, b, strict=False):
        if name_a != name_b:
            break
        total += min(n_a, n_b)
        if n_a != n_b:
            break
    return total


def cut(runs: Sequence[Run], tokens: int) -> Runs:
    """The first ``tokens`` of ``runs``."""
    out: list[Run] = []
    for name, n in runs:
        if tokens <= 0:
            break
        out.append((name, min(n, tokens)))
        tokens -= n
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _run_bytes(name: str, n: int) -> bytes:
    return hashlib.shake_256(name.encode()).digest(TOKEN_BYTES * n)


def render(runs: Sequence[Run]) -> bytes:
    """The bytes of ``runs``, four a token (a run's are a prefix of a longer one's)."""
    return b"".join(_run_bytes(name, n) for name, n in runs)


def token_ids(runs: Sequence[Run]) -> array.array[int]:
    ids = array.array("I", render(runs))
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


@attrs.define(eq=False)
class Slot:
    #: The tokens it keeps (of its last sequence, or restored).
    cached: Runs = ()
    busy: bool = False
    used_at: int = 0


@attrs.frozen
class Seat:
    """Where a prompt was seated and how much of it the cache gave."""

    slot: Slot
    #: Prompt tokens reused from the slot's own cells.
    slot_tokens: int
    #: Prompt tokens restored from the host tier (0: no restore).
    host_tokens: int

    @property
    def cached(self) -> int:
        return self.slot_tokens + self.host_tokens


@attrs.define(eq=False)
class PromptCache:
    """One loaded model's slots and host tier (see the module docstring)."""

    slots: int
    #: The host tier's budget (0: none).
    budget_bytes: int
    kv_bytes_per_token: int
    _slots: list[Slot] = attrs.field(init=False)
    #: Saved sequences, least recently used first.
    _host: collections.OrderedDict[Runs, None] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _steps: int = attrs.field(default=0, init=False)
    hits: int = 0
    misses: int = 0
    slot_tokens: int = 0
    host_tokens: int = 0
    host_saves: int = 0
    host_restores: int = 0
    host_evictions: int = 0

    def __attrs_post_init__(self) -> None:
        self._slots = [Slot() for _ in range(max(1, self.slots))]

    def host_bytes(self) -> int:
        return sum(length(r) for r in self._host) * self.kv_bytes_per_token

    def held_tokens(self) -> int:
        """Tokens the slots and the host tier hold (what an unload throws away)."""
        return sum(length(s.cached) for s in self._slots) + sum(length(r) for r in self._host)

    def seat(self, prompt: Runs) -> Seat:
        """Seat ``prompt`` in a free slot (one must be free) and mark it busy."""
        self._steps += 1
        free = [s for s in self._slots if not s.busy]
        assert free, "seat needs a free slot"
        # Leave the last prompt token to evaluate: its logits are needed.
        limit = length(prompt) - 1
        share = {id(s): min(shared(s.cached, prompt), limit) for s in free}
        worth = {k: n if n >= MIN_TOKENS or n == limit else 0 for k, n in share.items()}
        slot = max(free, key=lambda s: (worth[id(s)], not s.cached, share[id(s)], -s.used_at))
        keep = share[id(slot)]
        restored = self._restore(prompt, free, limit, keep)
        if restored is not None:
            slot, host = restored
            seat = Seat(slot, 0, host)
            self.host_tokens += host
        else:
            if length(slot.cached) - keep >= MIN_TOKENS:
                self._save(slot)
            slot.cached = cut(slot.cached, keep)
            seat = Seat(slot, keep, 0)
            self.slot_tokens += keep
        if seat.cached:
            self.hits += 1
        else:
            self.misses += 1
        slot.busy = True
        slot.used_at = self._steps
        return seat

    def done(self, seat: Seat, sequence: Runs) -> None:
        """The sequence in ``seat`` ended: its slot keeps ``sequence`` (prompt and answer)."""
        self._steps += 1
        seat.slot.cached = sequence
        seat.slot.busy = False
        seat.slot.used_at = self._steps

    def _restore(
        self, prompt: Runs, free: list[Slot], limit: int, keep: int
    ) -> tuple[Slot, int] | None:
        if not self._host:
            return None
        best, most = None, 0
        for saved in self._host:
            n = min(shared(saved, prompt), limit)
            if n > most:
                best, most = saved, n
        if best is None or most < keep + MIN_TOKENS:
            return None
        self._host.move_to_end(best)
        slot = min(free, key=lambda s: (bool(s.cached), s.used_at))
        self._save(slot)
        slot.cached = cut(best, most)
        self.host_restores += 1
        return slot, most

    def _save(self, slot: Slot) -> None:
        tokens = slot.cached
        size = length(tokens)
        if self.budget_bytes <= 0 or size < MIN_TOKENS:
            return
        if any(shared(saved, tokens) == size for saved in self._host):
            return  # covered by a saved state already
        if size * self.kv_bytes_per_token > self.budget_bytes:
            return
        for saved in [s for s in self._host if shared(s, tokens) == length(s)]:
            del self._host[saved]  # the newer state extends it
        self._host[tokens] = None
        self.host_saves += 1
        while self.host_bytes() > self.budget_bytes:
            self._host.popitem(last=False)
            self.host_evictions += 1

    def statistics(self) -> PromptCacheStatistics:
        """What a real engine's ``prompt_cache()`` reports, block hashes included."""
        held = [
            s.cached
            for s in sorted(self._slots, key=lambda s: s.used_at, reverse=True)
            if length(s.cached) >= BLOCK_TOKENS
        ]
        blocks: dict[str, None] = {}
        span = MAX_BLOCKS * BLOCK_TOKENS
        for runs in [*held, *reversed(self._host)]:
            for block in _hashes(cut(runs, span)):
                if len(blocks) >= MAX_BLOCKS:
                    break
                blocks.setdefault(block)
        return PromptCacheStatistics(
            hits=self.hits,
            misses=self.misses,
            slot_tokens=self.slot_tokens,
            host_tokens=self.host_tokens,
            host_saves=self.host_saves,
            host_restores=self.host_restores,
            host_evictions=self.host_evictions,
            host_bytes=self.host_bytes(),
            host_entries=len(self._host),
            host_budget_bytes=self.budget_bytes,
            blocks=tuple(blocks),
        )


@functools.lru_cache(maxsize=1024)
def _hashes(runs: Runs) -> tuple[str, ...]:
    return tuple(prefix_hashes(token_ids(runs)))
