"""What this gateway measured of its fleet, and the priors used until it has."""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs

#: Priors, used until this gateway has measured the real figure.
#: Load throughput from a neuron's disk into (device) memory, MiB/s.
PRIOR_LOAD_MBPS = 1000.0
#: Seconds a load takes besides moving the weights (engine start, warm-up).
LOAD_OVERHEAD_S = 1.0
#: Completion tokens of a request.
PRIOR_COMPLETION_TOKENS = 256.0
#: Decode is memory-bound: tokens/s is about this over the model's MiB.
PRIOR_DECODE = 400_000.0
#: Seconds an unload takes.
UNLOAD_S = 0.5
#: Memory of a model whose size nobody knows, MiB.
UNKNOWN_SIZE_MB = 4000
#: A victim with another replica costs this share of its reload.
REPLICA_PENALTY = 0.1
#: A model that thrashed lately costs this many times its reload to evict.
GUARD_FACTOR = 3.0
#: Weight of the newest sample in the moving averages.
ALPHA = 0.3
#: A model's request after this many idle seconds starts a new session of use.
SESSION_GAP = 60.0
#: Seconds ahead an eviction's penalty looks: a model asked for again within
#: them would have been better kept.
RETURN_HORIZON = 300.0
#: Prompt tokens a request must have had to process for its time to first
#: token to measure the prefill rate ...
PREFILL_SAMPLE_TOKENS = 256
#: ... and the samples after which that rate is trusted.
PREFILL_ENOUGH = 3
#: Times to first token kept to find the tail that patience may hold requests to.
FIRST_TOKEN_WINDOW = 1000
#: ... and how many must have been measured before that tail is trusted.
FIRST_TOKEN_ENOUGH = 100
#: ... and the least of that tail (its percentile: ``[routing] patience_tail``;
#: also used until enough requests were measured), seconds.
PATIENCE_LIMIT_FLOOR = 10.0
#: Gaps kept between an answer that called a tool and the request with its
#: result (``cortex.gateway.scheduler.follow_ups``) ...
FOLLOW_UP_SAMPLES = 1000
#: ... how many must have been measured before their tail is trusted ...
FOLLOW_UP_ENOUGH = 20
#: ... the percentile of them that a follow-up is waited for ...
FOLLOW_UP_PERCENTILE = 99.0
#: ... and the wait until then, seconds: a minute covers a test run or a
#: short build (most tools, a grep or a file read, take a second or two).
PRIOR_FOLLOW_UP_S = 60.0


@attrs.define
class Ewma:
    """An exponentially weighted moving average; None until the first sample."""

    value: float | None = None
    count: int = 0

    def add(self, sample: float, alpha: float = ALPHA) -> None:
        self.value = sample if self.value is None else self.value + alpha * (sample - self.value)
        self.count += 1


def _ewma(table: dict[Any, Ewma], key: Any) -> Ewma:
    found = table.get(key)
    if found is None:
        found = table[key] = Ewma()
    return found


def _nearest_rank(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of the sorted, non-empty ``ordered``."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@attrs.define(eq=False)
class Observations:
    """What this gateway measured of its fleet; the source of every prediction."""

    #: (neuron, model) -> seconds a load took (evictions not included).
    load_s: dict[tuple[str, str], Ewma] = attrs.field(factory=dict)
    #: neuron -> MiB/s its loads moved, over every model.
    load_mbps: dict[str, Ewma] = attrs.field(factory=dict)
    #: (neuron, model) -> seconds from route to release of a request.
    service_s: dict[tuple[str, str], Ewma] = attrs.field(factory=dict)
    #: (neuron, model) -> decode tokens/s, where the caller reported tokens.
    decode_tps: dict[tuple[str, str], Ewma] = attrs.field(factory=dict)
    #: model -> completion tokens per request, where reported.
    completion: dict[str, Ewma] = attrs.field(factory=dict)
    #: model -> seconds between two of its requests within a session.
    interarrival: dict[str, Ewma] = attrs.field(factory=dict)
    #: model -> seconds between the starts of two sessions (requests after
    #: ``SESSION_GAP`` idle): how popular it is.
    intersession: dict[str, Ewma] = attrs.field(factory=dict)
    #: (neuron, model) -> prompt tokens a request processed, and the seconds
    #: to its first token, averaged apart: their ratio is the prefill rate,
    #: whichever request's time is paired with whose tokens.
    prefill_tokens: dict[tuple[str, str], Ewma] = attrs.field(factory=dict)
    prefill_s: dict[tuple[str, str], Ewma] = attrs.field(factory=dict)
    last_arrival: dict[str, float] = attrs.field(factory=dict)
    session_start: dict[str, float] = attrs.field(factory=dict)
    #: Seconds to first token of the latest requests that patience did not
    #: hold back (what requests wait anyway), where the proxy could tell.
    first_token: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=FIRST_TOKEN_WINDOW)
    )
    #: ``first_token`` in order, kept until the next sample: every held
    #: request asks for the tail at each decision, far more often than
    #: requests end.
    _first_token_ordered: list[float] | None = attrs.field(default=None, init=False)
    #: Seconds from the latest answers that called a tool to the requests
    #: that brought their results (the tool's run and the client's turn).
    follow_up_gaps: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=FOLLOW_UP_SAMPLES)
    )
    _follow_up_ordered: list[float] | None = attrs.field(default=None, init=False)

    def record_load(self, neuron: str, model_id: str, size_mb: int, seconds: float) -> None:
        seconds = max(seconds, 1e-3)
        _ewma(self.load_s, (neuron, model_id)).add(seconds)
        if size_mb > 0:
            _ewma(self.load_mbps, neuron).add(size_mb / max(seconds - LOAD_OVERHEAD_S, 0.1))

    def record_request(
        self,
        neuron: str,
        model_id: str,
        seconds: float,
        *,
        completion_tokens: int | None = None,
        decode_s: float | None = None,
    ) -> None:
        _ewma(self.service_s, (neuron, model_id)).add(max(seconds, 0.0))
        if completion_tokens:
            _ewma(self.completion, model_id).add(completion_tokens)
            if decode_s and decode_s > 0 and completion_tokens > 1:
                _ewma(self.decode_tps, (neuron, model_id)).add(completion_tokens / decode_s)

    def record_prefill(self, neuron: str, model_id: str, tokens: float, seconds: float) -> None:
        """A request with ``tokens`` prompt tokens to process got its first token in ``seconds``.

        Only a request that found a free slot tells the prefill rate; fewer
        than ``PREFILL_SAMPLE_TOKENS`` tell mostly overheads, and are left out.
        """
        if tokens >= PREFILL_SAMPLE_TOKENS and seconds > 0:
            _ewma(self.prefill_tokens, (neuron, model_id)).add(tokens)
            _ewma(self.prefill_s, (neuron, model_id)).add(seconds)

    def prefill_tps(self, neuron: str, model_id: str) -> float | None:
        """Prompt tokens/s of ``model_id`` on ``neuron``; None until ``PREFILL_ENOUGH`` samples."""
        tokens = self.prefill_tokens.get((neuron, model_id))
        seconds = self.prefill_s.get((neuron, model_id))
        if tokens is None or seconds is None or tokens.count < PREFILL_ENOUGH:
            return None
        assert tokens.value is not None and seconds.value
        return tokens.value / seconds.value

    def record_first_token(self, seconds: float) -> None:
        self.first_token.append(seconds)
        self._first_token_ordered = None

    def first_token_percentile(self, q: float) -> float | None:
        """The ``q``-th percentile of ``first_token``; None until ``FIRST_TOKEN_ENOUGH`` came."""
        if len(self.first_token) < FIRST_TOKEN_ENOUGH:
            return None
        ordered = self._first_token_ordered
        if ordered is None:
            ordered = self._first_token_ordered = sorted(self.first_token)
        return _nearest_rank(ordered, q)

    def record_follow_up(self, seconds: float) -> None:
        """A request brought the result of a tool that an answer ``seconds`` ago called."""
        self.follow_up_gaps.append(max(seconds, 0.0))
        self._follow_up_ordered = None

    def follow_up_window(self, limit: float) -> float:
        """Seconds a follow-up is waited for after an answer that called a tool.

        The ``FOLLOW_UP_PERCENTILE`` of the gaps measured (``PRIOR_FOLLOW_UP_S``
        until ``FOLLOW_UP_ENOUGH`` were), at most ``limit`` (``[routing]
        follow_up_limit``).
        """
        if len(self.follow_up_gaps) < FOLLOW_UP_ENOUGH:
            return min(PRIOR_FOLLOW_UP_S, limit)
        ordered = self._follow_up_ordered
        if ordered is None:
            ordered = self._follow_up_ordered = sorted(self.follow_up_gaps)
        return min(_nearest_rank(ordered, FOLLOW_UP_PERCENTILE), limit)

    def record_arrival(self, model_id: str, now: float) -> None:
        """A request for ``model_id`` came at ``now`` (trio time)."""
        last = self.last_arrival.get(model_id)
        self.last_arrival[model_id] = now
        if last is not None and now - last <= SESSION_GAP:
            _ewma(self.interarrival, model_id).add(now - last)
            return
        started = self.session_start.get(model_id)
        if started is not None:
            _ewma(self.intersession, model_id).add(now - started)
        self.session_start[model_id] = now

    def load_seconds(self, neuron: str, model_id: str, size_mb: int) -> float:
        """Predicted seconds to load ``model_id`` on ``neuron``."""
        measured = self.load_s.get((neuron, model_id))
        if measured is not None and measured.value is not None:
            return measured.value
        elsewhere = [
            e.value for (_, m), e in self.load_s.items() if m == model_id and e.value is not None
        ]
        if elsewhere:
            return sum(elsewhere) / len(elsewhere)
        rate = self.load_mbps.get(neuron)
        mbps = rate.value if rate is not None and rate.value else PRIOR_LOAD_MBPS
        return LOAD_OVERHEAD_S + size_mb / mbps

    def service_seconds(self, neuron: str, model_id: str, size_mb: int) -> float:
        """Predicted seconds one request holds a slot of ``model_id`` on ``neuron``."""
        tps = self.decode_tps.get((neuron, model_id))
        tokens = self.completion.get(model_id)
        if tps is not None and tps.value:
            length = (
                tokens.value if tokens is not None and tokens.value else PRIOR_COMPLETION_TOKENS
            )
            return length / tps.value
        measured = self.service_s.get((neuron, model_id))
        if measured is not None and measured.value is not None:
            return measured.value
        prior_tps = min(500.0, max(2.0, PRIOR_DECODE / max(size_mb, 1)))
        return PRIOR_COMPLETION_TOKENS / prior_tps

    def mean_interarrival(self, model_id: str) -> float | None:
        found = self.interarrival.get(model_id)
        return found.value if found is not None else None

    def session_gap(self, model_id: str, now: float) -> float | None:
        """Seconds between sessions of ``model_id``: the mean, or longer if none came since."""
        found = self.intersession.get(model_id)
        started = self.session_start.get(model_id)
        if found is None or found.value is None or started is None:
            return None
        return max(found.value, now - started)
