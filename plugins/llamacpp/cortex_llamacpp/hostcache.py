"""The host tier of the prompt cache: sequence states saved in host memory.

A slot's KV cells are lost when another prompt takes the slot, or when
the pool needs room and drops an idle slot's cache. With more agent
sessions than slots that happens every turn, and every turn then
re-evaluates the whole conversation. The decoder copies such a slot's
state out first (``llama_state_seq_get_data``) into a ``HostCache``; a later
prompt that shares more of its start with a saved state than with any
slot gets that state copied back (``llama_state_seq_set_data``) and only
evaluates the rest.

The cache is a least-recently-used list of ``SavedState`` bounded by a byte
budget. An entry is keyed by the tokens whose cells it holds; a lookup
finds the entry sharing the longest common prefix with a prompt (it need
not be a prefix of the prompt: the cells past the shared part are dropped
after the restore). An entry that a newer one extends (all but fewer than
``MIN_TOKENS`` of its tokens shared) is dropped as superseded, so a session
keeps one entry that grows turn by turn.

Pure bookkeeping: nothing here calls llama.cpp, and the decoder calls
every method under its lock.
"""

from __future__ import annotations

import ctypes

import attrs
import numpy as np

from cortex.harness import prefix_hashes

#: States of fewer tokens are not worth saving, and a restore must gain at
#: least this many tokens over what a slot already holds.
MIN_TOKENS = 64


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading elements ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@attrs.define(eq=False)
class SavedState:
    """One sequence's KV state, as ``llama_state_seq_get_data`` wrote it.

    Attributes:
      tokens: the tokens whose cells the state holds, from position 0 (int32).
      data: the state bytes.
      blocks: ``prefix_hashes`` of ``tokens``.
    """

    tokens: np.ndarray
    data: ctypes.Array
    blocks: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return len(self.data)


@attrs.define
class HostCache:
    """A least-recently-used set of saved states within ``budget_bytes``.

    Attributes:
      budget_bytes: the most bytes the states may hold together.
      used_bytes: the bytes they hold now.
      saves: states added.
      evictions: states dropped for room (superseded ones are not counted).
    """

    budget_bytes: int
    used_bytes: int = 0
    saves: int = 0
    evictions: int = 0
    #: Least recently used first.
    _entries: list[SavedState] = attrs.field(factory=list)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: np.ndarray, limit: int) -> tuple[SavedState | None, int]:
        """The entry sharing the longest prefix with ``tokens``, and its length
        capped at ``limit``; (None, 0) when none shares any."""
        best, best_n = None, 0
        for entry in self._entries:
            n = min(common_prefix(entry.tokens, tokens), limit)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def covers(self, tokens: np.ndarray) -> bool:
        """Whether an entry holds all of ``tokens`` (and maybe more); the
        newest such entry counts as used."""
        for entry in reversed(self._entries):
            if common_prefix(entry.tokens, tokens) == len(tokens):
                self.touch(entry)
                return True
        return False

    def fits(self, nbytes: int) -> bool:
        """Whether a state of ``nbytes`` can be held at all."""
        return 0 < nbytes <= self.budget_bytes

    def add(self, tokens: np.ndarray, data: ctypes.Array) -> SavedState:
        """Hold a new state: drop the entries it supersedes, then the least
        recently used ones until it fits. The caller checked ``fits``."""
        entry = SavedState(tokens=tokens, data=data, blocks=tuple(prefix_hashes(tokens.tolist())))
        for old in list(self._entries):
            if len(old.tokens) <= len(tokens) and (
                common_prefix(old.tokens, tokens) > len(old.tokens) - MIN_TOKENS
            ):
                self._drop(old)
        while self._entries and self.used_bytes + entry.nbytes > self.budget_bytes:
            self._drop(self._entries[0])
            self.evictions += 1
        self._entries.append(entry)
        self.used_bytes += entry.nbytes
        self.saves += 1
        return entry

    def touch(self, entry: SavedState) -> None:
        """Mark ``entry`` the most recently used, if it is still held."""
        if entry in self._entries:
            self._entries.remove(entry)
            self._entries.append(entry)

    def clear(self) -> None:
        """Drop every state."""
        self._entries.clear()
        self.used_bytes = 0

    def _drop(self, entry: SavedState) -> None:
        self._entries.remove(entry)
        self.used_bytes -= entry.nbytes

    def blocks(self) -> list[tuple[str, ...]]:
        """Each entry's block hashes, most recently used first."""
        return [entry.blocks for entry in reversed(self._entries)]
