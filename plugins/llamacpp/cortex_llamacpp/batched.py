"""Continuous batching: many sequences decoded together in one llama.cpp context.

A ``BatchedDecoder`` owns one llama context with ``n_seq_max = parallel``
and one thread, the only one that touches the context. Callers of
``generate`` (any number of threads) put a sequence in the waiting line and
read its tokens from a small per-sequence buffer; the decode thread runs
steps:

1. Release the slots of sequences that ended or whose consumer left, and
   seat waiting sequences in free slots (the slot whose cached tokens share
   the longest prefix with the prompt, whose KV cells are then kept).
2. Build one ``llama_batch``: the last sampled token of every decoding
   sequence, then one chunk of one newcomer's prompt: at most
   ``prompt_chunk`` tokens while anyone is decoding (``n_batch`` when
   nobody is), so a long prompt costs the others a few short stalls
   instead of one long one. One prompt a step, so a burst of newcomers
   starts one after another: on a CPU, prompt processing is bound by
   compute, so batching prompts saves little, and the median newcomer gets
   its first token after half the burst's prompts instead of after all of
   them. The prompt with the fewest tokens left goes first (ties in
   arrival order), so a short prompt that arrives while a long one is
   evaluated waits for the chunk in hand, not for the whole long prompt.
   Ageing guard: each prompt counts the tokens of later arrivals' prompts
   evaluated while it waited (``overtaken``) and ranks by its tokens left
   less that, so once later prompts have taken as many tokens as it has
   left it goes first, to its end: a stream of short prompts can at most
   about double a long prompt's wait, never starve it.
3. One ``llama_decode``; then each sequence whose logits were computed
   samples with its own sampler chain and gets its token.

The KV cache is laid out one of two ways (``kv_unified``; the engine's
``auto`` takes per-sequence streams where their memory fits). A unified
pool of ``kv_cells`` cells that all slots share (llama-server's
``--kv-unified``): a slot costs nothing until it holds tokens, any one
sequence can reach the whole ``n_ctx``, and a step is one compute pass
whichever slots are busy, but its attention runs over the pool up to the
highest cell in use, so every cached prefix an idle slot keeps slows every
token. The pool is accounted for here, one cell per token: a waiting
sequence is seated only when its prompt fits beside what the others hold
(idle slots' cached prefixes are dropped first, least recently used
first), and when the decoding sequences between them fill the pool, the
one holding the most cells ends as if its context were full. Per-sequence
streams (``kv_unified=False``) give every slot its own ``n_ctx`` cells:
a sequence's attention covers only its own, but llama.cpp splits a step
into one pass per run of consecutive busy slot ids, so a hole (slot 1
idle while 0 and 2 decode) costs another pass (measured: three sessions
decoding in slots 1, 3 and 6 ran 18% slower than in 0, 1 and 2, and still
twice as fast as in a pool whose other slots held cached sessions).
Either way the attention mask keeps each sequence to its own cells. A slot
keeps the tokens it holds after its sequence ends, for prefix reuse;
everything past the shared prefix is removed (``llama_memory_seq_rm``)
before the slot is reused, so no stale cell survives.

Host tier (``hostcache``): when a slot's cells are about to go (another
prompt takes the slot and keeps less than it holds, or ``_make_room``
drops an idle slot's cache), the slot's state is first copied to host
memory with ``llama_state_seq_get_data``, unless it is shorter than
``MIN_TOKENS`` or already saved. A prompt that shares at least
``MIN_TOKENS`` more of its start with a saved state than with any free slot
gets that state copied into a free slot (``llama_state_seq_set_data``: an
empty one, else the least recently used, whose own cells are saved
first), cut to the shared part, and evaluates only the rest. A restore
needs room for the whole saved state (``_make_room``) and, in a unified
pool, one contiguous run of free cells for it (llama.cpp's rule); when it
fails the prompt is evaluated as if nothing were saved. Everything runs on
the decode thread, under the lock: the copies take milliseconds, a
re-evaluation seconds.

A lone sequence is decoded the way llama-cpp-python's ``Llama.generate``
does it (prompt in ``n_batch`` chunks, then one token per step, greedy
argmax for temperature 0), so its greedy output is the same.

Backpressure: a sequence whose consumer has ``AHEAD`` tokens unread sits
out of the batch until it reads one, so a slow client never grows a buffer
and never slows the others.

Cancellation: a sequence whose ``Cancellation`` is set (from any thread;
the neuron sets it when the client leaves) is closed at once: its consumer
stops waiting, and the next step leaves it out and frees its slot. A long
prompt thus stops between two of its chunks instead of being evaluated to
the end before anyone notices.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import llama_cpp
import numpy as np

from cortex.errors import HarnessError, InvalidRequest
from cortex.harness import (
    BLOCK_TOKENS,
    PromptCacheStatistics,
    Sampling,
    Token,
    common_prefix,
    prefix_hashes,
)

from .hostcache import MIN_TOKENS, HostCache, SavedState

log = logging.getLogger(__name__)

#: Tokens a sequence may have sampled and not yet handed to its consumer.
AHEAD = 4
#: The window of recent tokens the repetition penalties look at
#: (llama-cpp-python's ``last_n_tokens_size``).
PENALTY_LAST_N = 64
#: The most block hashes ``prompt_cache`` reports.
MAX_BLOCKS = 64
#: How long ``prompt_cache`` waits for the lock before answering from its last snapshot.
STATS_WAIT = 0.005


@attrs.frozen
class DecoderStatistics:
    """A snapshot of a decoder, for metrics and tests.

    Attributes:
      parallel: the number of slots.
      active: sequences seated in a slot (prompt processing or decoding).
      waiting: sequences waiting for a free slot.
      steps: ``llama_decode`` calls so far.
      prompt_tokens: prompt tokens evaluated so far.
      generated_tokens: tokens sampled so far.
      max_batch: the most tokens one step has held.
      kv_cells: the cells of the KV pool.
      kv_used: cells holding tokens (seated sequences and idle slots' caches).
      evicted_tokens: cached tokens of idle slots dropped to make room.
      preempted: sequences ended early because the pool was full.
      prompt_cache: hits and misses, prompt tokens reused from a slot
        (``slot_tokens``) or restored from the host tier, and the host
        tier's saves, restores, failures (llama.cpp found no contiguous
        run of cells), evictions and size; ``blocks`` left empty.
    """

    parallel: int
    active: int
    waiting: int
    steps: int
    prompt_tokens: int
    generated_tokens: int
    max_batch: int
    kv_cells: int
    kv_used: int
    evicted_tokens: int
    preempted: int
    prompt_cache: PromptCacheStatistics


class Cancellation:
    """A flag one thread sets to end a generation another thread is consuming.

    ``cancel`` may be called from any thread, before or during the
    generation, any number of times. Whoever runs the generation registers
    a callback with ``on_cancel`` that wakes it; the callback runs once,
    outside this object's lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._wake: Callable[[], None] | None = None

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            wake, self._wake = self._wake, None
        if wake is not None:
            wake()

    def is_cancelled(self) -> bool:
        return self._cancelled

    def on_cancel(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when cancelled: now, if it already is."""
        with self._lock:
            if not self._cancelled:
                self._wake = wake
                return
        wake()


class _Sequence:
    """One request's state, shared by its consumer and the decode thread.

    Fields other than ``out``, ``finished``, ``error`` and ``closed`` belong
    to the decode thread; those four are read and written under the lock.
    """

    def __init__(self, tokens: list[int], sampler: llama_cpp.llama_sampler_p, wake: Any) -> None:
        self.tokens = tokens
        self.n_prompt = len(tokens)
        self.sampler = sampler
        self.wake = wake
        #: The prompt as int32, for matching against the host tier.
        self.prompt = np.asarray(tokens, dtype=np.int32)
        #: Prompt tokens whose cells came from a cache (slot or host tier).
        self.reused = 0
        self.slot: _Slot | None = None
        #: Tokens of ``tokens`` in the slot's KV cells.
        self.n_past = 0
        #: Prompt tokens of sequences seated after this one evaluated while
        #: its own prompt waited (the ageing guard of ``_plan``).
        self.overtaken = 0
        #: The last sampled token, to feed in the next step; None while the
        #: prompt is being processed.
        self.next_token: int | None = None
        self.out: collections.deque[int] = collections.deque()
        self.finished = False
        self.error: BaseException | None = None
        self.closed = False


@attrs.define(eq=False)
class _Slot:
    seq_id: int
    #: The tokens whose KV cells this sequence id holds, from position 0.
    cached: list[int] = attrs.field(factory=list)
    sequence: _Sequence | None = None
    #: The decode step at which it was last seated or released (LRU order).
    used_at: int = 0


class BatchedDecoder:
    """Decodes up to ``parallel`` sequences at once through one context.

    Args:
      model: the loaded llama model (weights); not owned.
      params: context parameters to start from (threads, flash attention, ...).
      parallel: the number of sequences decoded at once.
      n_ctx: the context of one sequence, a multiple of 256.
      kv_cells: the cells of the unified pool, at least ``n_ctx``; ignored
        with ``kv_unified=False`` (each slot then has ``n_ctx`` of its own).
      n_batch: the most prompt tokens evaluated in one step when nobody decodes.
      prompt_chunk: the most prompt tokens evaluated in one step while others decode.
      kv_unified: one KV pool for all sequences instead of one stream each.
      keep_alive: an object the context depends on (the Llama that owns the
        model), kept referenced until ``close``.
      host_cache_bytes: the host tier's byte budget; 0 turns it off.

    Raises:
      HarnessError: llama.cpp cannot create the context.
    """

    def __init__(
        self,
        *,
        model: llama_cpp.llama_model_p,
        params: llama_cpp.llama_context_params,
        parallel: int,
        n_ctx: int,
        n_batch: int,
        prompt_chunk: int,
        kv_cells: int | None = None,
        kv_unified: bool = True,
        keep_alive: object = None,
        host_cache_bytes: int = 0,
    ) -> None:
        self.parallel = parallel
        self.n_ctx = n_ctx
        if kv_unified:
            self.kv_cells = max(kv_cells or n_ctx, n_ctx)
        else:
            self.kv_cells = n_ctx * parallel
        self._kv_unified = kv_unified
        self._n_batch = n_batch
        self._prompt_chunk = min(prompt_chunk, n_batch)
        self._keep_alive = keep_alive
        capacity = n_batch + parallel
        params = llama_cpp.llama_context_params.from_buffer_copy(params)
        params.n_ctx = self.kv_cells
        params.n_seq_max = parallel
        params.n_batch = capacity
        params.n_ubatch = min(capacity, max(n_batch, 512))
        params.kv_unified = kv_unified
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise HarnessError(f"llama.cpp could not create a context for {parallel} sequences")
        self._ctx = ctx
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_swa = llama_cpp.llama_model_n_swa(model)
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._capacity = capacity
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(capacity,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(capacity,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(capacity,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(capacity,))[:] = 1
        self._b_seq = [self._batch.seq_id[i] for i in range(capacity)]

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._slots = [_Slot(seq_id=i) for i in range(parallel)]
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._closing = False
        self._failure: BaseException | None = None
        self._steps = 0
        self._prompt_tokens = 0
        self._reused_tokens = 0
        self._generated_tokens = 0
        self._max_batch = 0
        self._evicted_tokens = 0
        self._preempted = 0
        self._host = HostCache(host_cache_bytes) if host_cache_bytes > 0 else None
        self._host_tokens = 0
        self._hits = 0
        self._misses = 0
        self._host_restores = 0
        self._host_failures = 0
        self._last_prompt_cache = PromptCacheStatistics()
        self._thread = threading.Thread(target=self._run, name="llama-batched-decode", daemon=True)
        self._thread.start()

    # -- the consumer side (any thread) ---------------------------------------------------

    def statistics(self) -> DecoderStatistics:
        with self._lock:
            return self._statistics()

    def _statistics(self) -> DecoderStatistics:
        # (A HostCache has a length: test it against None, never for truth.)
        host = self._host if self._host is not None else HostCache(0)
        return DecoderStatistics(
            parallel=self.parallel,
            active=sum(1 for s in self._active if not (s.closed or s.finished)),
            waiting=len(self._waiting),
            steps=self._steps,
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated_tokens,
            max_batch=self._max_batch,
            kv_cells=self.kv_cells,
            kv_used=sum(len(slot.cached) for slot in self._slots),
            evicted_tokens=self._evicted_tokens,
            preempted=self._preempted,
            prompt_cache=PromptCacheStatistics(
                hits=self._hits,
                misses=self._misses,
                slot_tokens=self._reused_tokens,
                host_tokens=self._host_tokens,
                host_saves=host.saves,
                host_restores=self._host_restores,
                host_failures=self._host_failures,
                host_evictions=host.evictions,
                host_bytes=host.used_bytes,
                host_entries=len(host),
                host_budget_bytes=host.budget_bytes,
            ),
        )

    @property
    def steps(self) -> int:
        """``llama_decode`` calls so far, read without the lock.

        For ``LoadedModel.progress``, asked from the neuron's event loop:
        ``statistics`` would wait while the decode thread holds the lock. A
        long prompt takes one call per chunk of at most ``n_batch`` tokens,
        so the count moves while it is evaluated.
        """
        return self._steps

    def prompt_cache(self) -> PromptCacheStatistics:
        """The prompt cache for ``LoadedModel.prompt_cache``, with block hashes.

        Hashes come from the slots (most recently used first), then the host
        tier's states (the same), at most ``MAX_BLOCKS``. The hashing runs
        outside the lock.

        The neuron asks from its event loop, and the decode thread holds the
        lock while it copies states (milliseconds, more for large models):
        when the lock is not free within ``STATS_WAIT`` seconds, the last
        answer is given again.
        """
        if not self._lock.acquire(timeout=STATS_WAIT):
            return self._last_prompt_cache
        try:
            stats = self._statistics()
            span = MAX_BLOCKS * BLOCK_TOKENS
            held = [
                slot.cached[:span]
                for slot in sorted(self._slots, key=lambda s: s.used_at, reverse=True)
                if len(slot.cached) >= BLOCK_TOKENS
            ]
            saved = self._host.blocks() if self._host is not None else []
        finally:
            self._lock.release()
        blocks: dict[str, None] = {}
        for hashes in [*(prefix_hashes(tokens) for tokens in held), *saved]:
            for block in hashes:
                if len(blocks) < MAX_BLOCKS:
                    blocks.setdefault(block)
        self._last_prompt_cache = attrs.evolve(stats.prompt_cache, blocks=tuple(blocks))
        return self._last_prompt_cache

    def generate(
        self,
        tokens: list[int],
        sampling: Sampling,
        piece: Callable[[int], bytes],
        *,
        grammar: str | None = None,
        cancellation: Cancellation | None = None,
    ) -> Iterator[Token]:
        """Yield the tokens generated after ``tokens``; see ``LoadedModel.generate``.

        The prompt must already be checked (non-empty, ids in the vocabulary,
        shorter than ``n_ctx``). Ends at end-of-generation or when the
        sequence's context is full.

        Resource handling: closing the iterator (or dropping it) takes the
        sequence out of the next step and frees its slot.

        Cancellation: once ``cancellation`` is set the iterator ends (it
        stops waiting, even for its first token), and the sequence is out of
        the next step: a prompt being evaluated stops after the chunk in
        hand.

        Args:
          grammar: GBNF text that constrains the output, or None.
          cancellation: ends the generation from another thread.

        Raises:
          InvalidRequest: the grammar does not parse.
          HarnessError: the decoder is closed, or llama.cpp failed.
        """
        sampler = self._sampler(sampling, grammar)
        sequence = _Sequence(list(tokens), sampler, threading.Condition(self._lock))
        with self._lock:
            if self._closing or self._failure is not None:
                llama_cpp.llama_sampler_free(sampler)
                raise HarnessError("the model is unloaded") from self._failure
            self._waiting.append(sequence)
            self._work.notify()
        if cancellation is not None:
            cancellation.on_cancel(lambda: self._cancel(sequence))
        first = True
        try:
            while True:
                with self._lock:
                    while not (sequence.out or sequence.finished or sequence.closed):
                        sequence.wake.wait()
                    if sequence.closed:
                        return
                    if not sequence.out:
                        if sequence.error is not None:
                            raise sequence.error
                        return
                    token = sequence.out.popleft()
                    if len(sequence.out) == AHEAD - 1:
                        # It may have sat out the last steps: let it back in.
                        self._work.notify()
                if first:
                    first = False
                    # Seated before its first token: ``reused`` is final.
                    yield Token(id=token, piece=piece(token), cached_tokens=sequence.reused)
                else:
                    yield Token(id=token, piece=piece(token))
        finally:
            with self._lock:
                sequence.closed = True
                if sequence.slot is None and sequence in self._waiting:
                    # Never seated: the decode thread has not touched it.
                    self._waiting.remove(sequence)
                    llama_cpp.llama_sampler_free(sampler)
                else:
                    self._work.notify()

    def _cancel(self, sequence: _Sequence) -> None:
        """Close ``sequence`` from any thread: its consumer stops waiting, the
        decode thread leaves it out of the next step and frees its slot."""
        with self._lock:
            sequence.closed = True
            sequence.wake.notify()
            self._work.notify()

    def _sampler(self, sampling: Sampling, grammar: str | None) -> llama_cpp.llama_sampler_p:
        """A sampler chain for one request, in llama-cpp-python's order."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: llama_cpp.llama_sampler_p) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if (
            sampling.repeat_penalty != 1.0
            or sampling.frequency_penalty != 0.0
            or sampling.presence_penalty != 0.0
        ):
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab,
                    PENALTY_LAST_N,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(
                self._vocab, grammar.encode("utf-8"), b"root"
            )
            if not constraint:
                # A NULL sampler in a chain would crash the process.
                llama_cpp.llama_sampler_free(chain)
                raise InvalidRequest("the grammar does not parse as GBNF", param="grammar")
            add(constraint)
        if sampling.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def close(self) -> None:
        """End every sequence, stop the decode thread, free the context. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._work.notify()
        self._thread.join()
        with self._lock:
            for sequence in [*self._active, *self._waiting]:
                self._end(sequence, HarnessError("the model is unloaded"))
            for sequence in self._waiting:
                llama_cpp.llama_sampler_free(sequence.sampler)
            self._waiting.clear()
            for sequence in self._active:
                self._release(sequence)
            if self._host is not None:
                self._host.clear()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._keep_alive = None

    # -- the decode thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while True:
                        self._reap()
                        self._seat()
                        if self._closing:
                            return
                        plan = self._plan()
                        if plan:
                            break
                        self._work.wait()
                self._step(plan)
        except BaseException as exc:
            log.exception("the batched decode loop failed")
            with self._lock:
                self._failure = exc
                for sequence in [*self._active, *self._waiting]:
                    self._end(sequence, HarnessError(f"the decode loop failed: {exc!r}"))

    def _end(self, sequence: _Sequence, error: BaseException | None = None) -> None:
        """Mark ``sequence`` finished (under the lock) and wake its consumer."""
        if not sequence.finished:
            sequence.finished = True
            sequence.error = error
            sequence.wake.notify()

    def _release(self, sequence: _Sequence) -> None:
        """Free the slot and sampler of a seated sequence (under the lock)."""
        slot = sequence.slot
        assert slot is not None
        slot.sequence = None
        slot.used_at = self._steps
        sequence.slot = None
        self._active.remove(sequence)
        llama_cpp.llama_sampler_free(sequence.sampler)

    def _reap(self) -> None:
        for sequence in list(self._active):
            if sequence.closed or sequence.finished:
                self._end(sequence)
                self._release(sequence)

    def _seat(self) -> None:
        """Seat waiting sequences in free slots, reusing the longest cached prefix.

        The prefix comes from a free slot's cells or, when it is at least
        ``MIN_TOKENS`` longer there, from a state in the host tier. In a
        unified pool a sequence is seated only when its prompt fits in the
        cells left; it waits (and the ones behind it too: first come, first
        served) until then.
        """
        while self._waiting:
            free = [slot for slot in self._slots if slot.sequence is None]
            if not free:
                return
            sequence = self._waiting[0]
            # Leave the last prompt token to evaluate: its logits are needed.
            limit = sequence.n_prompt - 1
            shared = {
                slot.seq_id: min(common_prefix(slot.cached, sequence.tokens), limit)
                for slot in free
            }
            # A long shared prefix (or all of a short prompt) first; else an
            # empty slot (a few shared tokens, such as a BOS, are not worth
            # another's cache); then the most shared; then the least recently
            # used.
            worth = {i: n if n >= MIN_TOKENS or n == limit else 0 for i, n in shared.items()}
            slot = max(
                free,
                key=lambda s: (worth[s.seq_id], not s.cached, shared[s.seq_id], -s.used_at),
            )
            keep = shared[slot.seq_id]
            restored = self._restore(sequence, free, limit, keep)
            if restored is not None:
                slot, keep = restored
                self._host_tokens += keep
            else:
                # A restore that failed may have emptied the slot.
                keep = min(keep, len(slot.cached))
                if self._kv_unified and not self._make_room(
                    sequence.n_prompt - keep + 1, keep=slot, keep_cells=keep
                ):
                    return
                if keep and self._n_swa:
                    # A sliding-window cache may have dropped cells the kept
                    # prefix still needs (llama-server checks the same).
                    pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id)
                    if pos_min > max(0, keep - self._n_swa):
                        keep = 0
                if len(slot.cached) - keep >= MIN_TOKENS:
                    self._save(slot)
                if keep < len(slot.cached) and not llama_cpp.llama_memory_seq_rm(
                    self._memory, slot.seq_id, keep, -1
                ):
                    keep = 0  # recurrent state: a partial removal is not possible
                if keep == 0:
                    llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                del slot.cached[keep:]
                self._reused_tokens += keep
            self._waiting.popleft()
            slot.sequence = sequence
            slot.used_at = self._steps
            sequence.slot = slot
            sequence.n_past = keep
            sequence.reused = keep
            if keep:
                self._hits += 1
            else:
                self._misses += 1
            self._active.append(sequence)

    def _restore(
        self, sequence: _Sequence, free: list[_Slot], limit: int, keep: int
    ) -> tuple[_Slot, int] | None:
        """Restore the host tier's best state for ``sequence`` into a free slot.

        Only when it shares at least ``MIN_TOKENS`` more than ``keep`` (what
        the best free slot holds) and the pool has room for it. Returns the
        slot, holding the shared prefix, and the prefix's length; None when
        nothing was restored (the slots are then as they were, but for
        caches ``_make_room`` dropped).
        """
        if self._host is None:
            return None
        entry, shared = self._host.match(sequence.prompt, limit)
        if entry is None or shared < keep + MIN_TOKENS:
            return None
        # Most recently used before the saves below, which may evict for room.
        self._host.touch(entry)
        slot = min(free, key=lambda s: (bool(s.cached), s.used_at))
        saved = len(entry.tokens)
        if self._kv_unified and not self._make_room(
            max(saved, sequence.n_prompt + 1), keep=slot, keep_cells=0
        ):
            return None
        self._save(slot)
        slot.cached.clear()
        if not self._set_state(slot, entry):
            return None
        if shared < saved and not llama_cpp.llama_memory_seq_rm(
            self._memory, slot.seq_id, shared, -1
        ):
            shared = 0  # recurrent state: a partial removal is not possible
        if shared and self._n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id)
            if pos_min > max(0, shared - self._n_swa):
                shared = 0
        if shared == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            return None
        slot.cached = entry.tokens[:shared].tolist()
        self._host_restores += 1
        return slot, shared

    def _set_state(self, slot: _Slot, entry: SavedState) -> bool:
        """Copy ``entry`` into ``slot``'s (emptied) sequence; False if llama.cpp refused."""
        if llama_cpp.llama_state_seq_set_data(self._ctx, entry.data, entry.nbytes, slot.seq_id):
            return True
        # llama.cpp leaves the sequence empty; a unified pool may lack one
        # contiguous run of free cells for the whole state.
        self._host_failures += 1
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        return False

    def _save(self, slot: _Slot) -> None:
        """Copy ``slot``'s state to the host tier, unless it is short, already
        saved, or larger than the whole budget."""
        host = self._host
        if host is None or len(slot.cached) < MIN_TOKENS:
            return
        tokens = np.asarray(slot.cached, dtype=np.int32)
        if host.covers(tokens):
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if not host.fits(size):
            return
        data = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id)
        if written != size:
            log.warning("saving a sequence state wrote %d of %d bytes; not kept", written, size)
            return
        host.add(tokens, data)

    def _kv_free(self) -> int:
        """Cells neither holding tokens nor promised to a seated prompt."""
        used = sum(len(slot.cached) for slot in self._slots)
        promised = sum(s.n_prompt - s.n_past for s in self._active if s.next_token is None)
        return self.kv_cells - used - promised

    def _make_room(self, cells: int, *, keep: _Slot | None = None, keep_cells: int = 0) -> bool:
        """Drop idle slots' cached prefixes, least recently used first, until
        ``cells`` are free; True if they are.

        ``keep`` is the slot about to be reused: its first ``keep_cells``
        cells stay, the rest of its cache is counted as freed.
        """
        spare = len(keep.cached) - keep_cells if keep is not None else 0
        if self._kv_free() + spare >= cells:
            return True
        idle = sorted(
            (s for s in self._slots if s.sequence is None and s.cached and s is not keep),
            key=lambda s: s.used_at,
        )
        for slot in idle:
            self._save(slot)
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            self._evicted_tokens += len(slot.cached)
            slot.cached.clear()
            if self._kv_free() + spare >= cells:
                return True
        return False

    def _preempt(self, cells: int) -> None:
        """Free ``cells`` for this step's decoding tokens: idle caches first,
        then end the decoding sequences holding the most cells (finish
        ``length``, as at a full context). Under the lock."""
        if self._make_room(cells):
            return
        decoding = sorted(
            (s for s in self._active if s.next_token is not None and not s.finished),
            key=lambda s: s.n_past,
            reverse=True,
        )
        for sequence in decoding:
            assert sequence.slot is not None
            self._preempted += 1
            self._end(sequence)
            sequence.next_token = None
            llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot.seq_id, -1, -1)
            sequence.slot.cached.clear()
            if len(sequence.out) < AHEAD:
                cells -= 1  # it needed one this step
            if self._kv_free() >= cells:
                return

    def _plan(self) -> list[tuple[_Sequence, int, int]]:
        """This step's (sequence, first index, count) runs of tokens; empty when idle."""
        if self._kv_unified:
            needed = sum(1 for s in self._active if s.next_token is not None and len(s.out) < AHEAD)
            if needed and self._kv_free() < needed:
                self._preempt(needed)
        plan = []
        decoding = False
        for sequence in self._active:
            if sequence.next_token is not None and not sequence.finished:
                # One sitting out for its consumer still counts: it must not
                # wait behind a whole prompt once its consumer is back.
                decoding = True
                if len(sequence.out) < AHEAD:
                    plan.append((sequence, sequence.n_past, 1))
        prompts = [
            (i, s)
            for i, s in enumerate(self._active)
            if s.next_token is None and s.n_past < s.n_prompt and not s.finished
        ]
        if prompts:
            # One prompt a step (a chunk of it, or all that is left): a burst
            # of newcomers gets first tokens one after another (the median
            # waits for half the prompts) rather than all after the last.
            # The fewest tokens left goes first, so a short prompt is not
            # held behind a long one; a prompt that later arrivals have
            # overtaken by as many tokens as it has left goes first, so it
            # waits for them at most about as long as its own evaluation.
            # Ties go in arrival (seat) order.
            index, sequence = min(prompts, key=self._prompt_order)
            budget = self._prompt_chunk if decoding else self._n_batch
            count = min(budget, sequence.n_prompt - sequence.n_past)
            plan.append((sequence, sequence.n_past, count))
            for i, earlier in prompts:
                if i < index:
                    earlier.overtaken += count
        # Ascending sequence ids: llama.cpp's per-stream split needs them.
        plan.sort(key=lambda run: run[0].slot.seq_id)  # type: ignore[union-attr]
        return plan

    @staticmethod
    def _prompt_order(prompt: tuple[int, _Sequence]) -> tuple[int, int]:
        """Which of the (seat, sequence) prompts waiting goes first: the smallest.

        Tokens left, less what later arrivals took ahead of it; then the seat.
        """
        seat, sequence = prompt
        return sequence.n_prompt - sequence.n_past - sequence.overtaken, seat

    def _step(self, plan: list[tuple[_Sequence, int, int]]) -> None:
        """Evaluate ``plan`` in one llama_decode and sample; outside the lock."""
        n = 0
        samples: list[tuple[_Sequence, int]] = []
        for sequence, start, count in plan:
            assert sequence.slot is not None
            seq_id = sequence.slot.seq_id
            if sequence.next_token is not None:
                self._b_token[n] = sequence.next_token
            else:
                self._b_token[n : n + count] = sequence.tokens[start : start + count]
            self._b_pos[n : n + count] = np.arange(start, start + count)
            self._b_logits[n : n + count] = 0
            for i in range(n, n + count):
                self._b_seq[i][0] = seq_id
            n += count
            if sequence.next_token is not None or start + count == sequence.n_prompt:
                self._b_logits[n - 1] = 1
                samples.append((sequence, n - 1))
        self._batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, self._batch)

        with self._lock:
            self._steps += 1
            self._max_batch = max(self._max_batch, n)
            if status != 0:
                error = HarnessError(f"llama_decode failed with status {status}")
                for sequence, _, _ in plan:
                    assert sequence.slot is not None
                    llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot.seq_id, -1, -1)
                    sequence.slot.cached.clear()
                    self._end(sequence, error)
                return
            for sequence, start, count in plan:
                assert sequence.slot is not None
                if sequence.next_token is not None:
                    sequence.tokens.append(sequence.next_token)
                    sequence.slot.cached.append(sequence.next_token)
                    sequence.next_token = None
                else:
                    sequence.slot.cached.extend(sequence.tokens[start : start + count])
                    self._prompt_tokens += count
                sequence.n_past += count

        # Sampling reads this step's logits; no one else touches the context.
        sampled = [
            (sequence, llama_cpp.llama_sampler_sample(sequence.sampler, self._ctx, index))
            for sequence, index in samples
        ]

        with self._lock:
            for sequence, token in sampled:
                self._generated_tokens += 1
                if sequence.closed or sequence.finished:
                    continue
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    self._end(sequence)
                    continue
                sequence.out.append(token)
                sequence.wake.notify()
                if len(sequence.tokens) + 1 >= self.n_ctx:
                    self._end(sequence)  # the context is full
                else:
                    sequence.next_token = token
