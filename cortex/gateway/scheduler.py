"""Scheduling: what the router predicts, which route it takes, who waits.

For each request the router lists its :class:`Option` s, each with a
predicted time to first token: a loaded replica, a load in progress, a cold
load on a neuron with room, a cold load after evictions. Its :class:`Policy`
takes one. When none is open (memory held by busy models, the thrash guard,
an older waiter first in line) a policy that ``waits`` parks the request in
the :class:`WaitQueue` until something changes; the others answer 503.

Predictions (:class:`Predictor`) come from :class:`Observations`, what this
gateway measured: load seconds per model and neuron (else that neuron's load
throughput applied to the model's size, else a prior from the size), seconds
per request and decode tokens/s per model and neuron, the time between a
model's requests; and the requests queued and in flight against the model's
slots, from the neurons' /models and the gateway's own counts.

Policies (``[routing] policy``):

- ``predictive``, the default: the option with the smallest predicted time
  to first token. An eviction adds a penalty: the victim's reload time times
  the chance it is asked for again soon (from its recency and request rate),
  so models in use stay. A model with requests waiting at the gateway is not
  evicted, nor one that thrashed (reloaded within ``thrash_window`` of its
  eviction) in the ``min_residency`` seconds after that reload: the thrash
  guard; requests for others wait and are served together. With
  ``patience``, a request waits before an eviction that its penalty times
  ``patience`` is more than it has waited, never so long that its first
  token would come later than ``patience_limit`` (by default: the slowest
  1% of the requests it did not hold); a request held so claims no room,
  and others take what frees meanwhile. When the
  predicted wait on a model's replicas has stayed above ``scale_out_wait``
  for ``scale_out_after`` seconds and a neuron has room (or only stale
  models to evict), a further replica is loaded; it goes again after
  ``scale_in_idle`` seconds idle.
- ``fixed``: loaded > loading > cold load, evicting by [eviction] strategy:
  the order LocalAI and most gateways use. No queue: 503 when nothing fits.
- ``static``: every model has one home neuron (llama-swap's groups) where it
  is swapped in on demand, evicting the least recently used; requests wait
  for busy models to finish.

Everything here is synchronous: the router calls it between awaits.
"""

from __future__ import annotations

import collections
import math
from typing import Any, ClassVar, Literal

import attrs
import trio

from cortex.config import GatewayConfig
from cortex.gateway.evictor import Plan, Spare, VictimKey
from cortex.gateway.state import (
    LOADED,
    FleetState,
    NeuronState,
    PendingLoad,
    capacity,
    feasible,
)

Kind = Literal["loaded", "loading", "cold", "evict"]
POLICIES = ("predictive", "fixed", "static")

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
#: Times to first token kept to find the tail that patience may hold requests to.
FIRST_TOKEN_WINDOW = 1000
#: ... and how many must have been measured before that tail is trusted.
FIRST_TOKEN_ENOUGH = 100
#: ... that tail's percentile ...
PATIENCE_TAIL = 99.0
#: ... and the least of it (also used until enough requests were measured), seconds.
PATIENCE_LIMIT_FLOOR = 10.0


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
    last_arrival: dict[str, float] = attrs.field(factory=dict)
    session_start: dict[str, float] = attrs.field(factory=dict)
    #: Seconds to first token of the latest requests that patience did not
    #: hold back (what requests wait anyway), where the proxy could tell.
    first_token: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=FIRST_TOKEN_WINDOW)
    )

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

    def record_first_token(self, seconds: float) -> None:
        self.first_token.append(seconds)

    def first_token_percentile(self, q: float) -> float | None:
        """The ``q``-th percentile of ``first_token``; None until ``FIRST_TOKEN_ENOUGH`` came."""
        if len(self.first_token) < FIRST_TOKEN_ENOUGH:
            return None
        ordered = sorted(self.first_token)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

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


def slots_of(neuron: NeuronState, model_id: str) -> int:
    """Requests the model generates at once there (the neuron's ``parallel``; else 1)."""
    status = neuron.models.get(model_id)
    return max(1, status.parallel) if status is not None else 1


@attrs.frozen
class Option:
    """One way to serve a request, and its predicted time to first token."""

    kind: Kind
    neuron: NeuronState
    predicted: float
    #: cold, evict: where to load and what to unload first.
    plan: Plan | None = None
    #: loading: our load in progress (None: one the neuron reports, to join).
    load: PendingLoad | None = None
    #: The part of ``predicted`` that is the evictions' penalty.
    penalty: float = 0.0


@attrs.frozen
class Decision:
    """The option a policy takes (None: wait, or refuse when it does not wait)."""

    route: Option | None
    #: A further replica being added for this model (counted as scale-out).
    scale_out: bool = False
    #: No route: seconds after which deciding again may give one, whatever
    #: else happens (inf: only once the fleet changes).
    recheck: float = math.inf
    #: No route: the model is loaded but its slots are taken; wait for one
    #: at the gateway (``expected`` seconds, as predicted).
    slot: bool = False
    expected: float = 0.0
    #: No route: one is open, but the policy holds the request back for now
    #: (patience). It claims no room, so others may take what frees meanwhile.
    hold: bool = False


@attrs.define(eq=False)
class Predictor:
    """Time-to-first-token predictions over the fleet state and the observations."""

    state: FleetState
    observations: Observations
    #: Seconds after which an idle model is as good as gone (the thrash window).
    horizon: float = 600.0
    #: Guarded models (they thrashed lately) cost this many times their reload.
    thrash: ThrashLog | None = None

    def size(self, model_id: str) -> int:
        entry = self.state.catalogue.models.get(model_id)
        if entry is not None and entry.vram_mb:
            return entry.vram_mb
        for neuron in self.state.neurons.values():
            status = neuron.models.get(model_id)
            if status is not None and status.memory_mb:
                return status.memory_mb
        return UNKNOWN_SIZE_MB

    def service(self, neuron: NeuronState, model_id: str) -> float:
        return self.observations.service_seconds(neuron.name, model_id, self.size(model_id))

    def load(self, neuron: NeuronState, model_id: str) -> float:
        return self.observations.load_seconds(neuron.name, model_id, self.size(model_id))

    def replica_wait(self, neuron: NeuronState, model_id: str, ahead: int | None = None) -> float:
        """Seconds until a new request gets a slot of the loaded model there.

        ``ahead``: requests before it (default: the ones there now).
        """
        slots = slots_of(neuron, model_id)
        busy = neuron.busy(model_id) if ahead is None else ahead
        if busy < slots:
            return 0.0
        return (busy - slots + 1) * self.service(neuron, model_id) / slots

    def loading(
        self, neuron: NeuronState, model_id: str, load: PendingLoad | None, now: float
    ) -> float:
        """Seconds until a request that joins this load gets a slot."""
        started = load.started if load is not None else None
        total = self.load(neuron, model_id)
        left = total - (now - started) if started is not None else total / 2
        # Past the prediction it is still loading: assume a little more.
        left = max(left, 0.1 * total)
        waiting = load.waiters if load is not None else 0
        return left + self.replica_wait(neuron, model_id, ahead=waiting)

    def return_chance(self, model_id: str, idle: float) -> float:
        """How likely ``model_id`` is asked for within ``RETURN_HORIZON`` seconds.

        Either its current session goes on (likely while it has been idle for
        less than a few of its usual gaps) or a new one starts (as often as
        sessions of it have been starting).
        """
        gap = self.observations.mean_interarrival(model_id)
        scale = min(max(3.0 * gap, 30.0), self.horizon) if gap is not None else 60.0
        going_on = math.exp(-max(idle, 0.0) / scale)
        between = self.observations.session_gap(model_id, trio.current_time())
        new = 1.0 - math.exp(-RETURN_HORIZON / between) if between else 0.0
        return 1.0 - (1.0 - going_on) * (1.0 - new)

    def penalty(self, neuron: NeuronState, victim: str) -> float:
        """Expected seconds of reload that evicting ``victim`` from ``neuron`` costs later."""
        idle = self.state.clock() - neuron.recency(victim)
        cost = self.return_chance(victim, idle) * self.load(neuron, victim)
        if self.thrash is not None and self.thrash.guarded(victim, trio.current_time()):
            cost *= GUARD_FACTOR
        others = any(
            n is not neuron and n.routable and n.status_of(victim) == LOADED
            for n in self.state.neurons.values()
        )
        return cost * REPLICA_PENALTY if others else cost

    def cold(self, neuron: NeuronState, model_id: str, plan: Plan) -> tuple[float, float]:
        """(predicted seconds, of which penalty) for loading after ``plan``'s evictions."""
        penalty = sum(self.penalty(neuron, v) for v in plan.evictions)
        return self.load(neuron, model_id) + UNLOAD_S * len(plan.evictions) + penalty, penalty


# -- the queue ----------------------------------------------------------------------


@attrs.define(eq=False)
class Ticket:
    """One request waiting at the gateway."""

    model_id: str
    #: trio time it arrived.
    arrived: float
    #: Neurons it waits for room on (empty: it waits on a load or a replica).
    wants: frozenset[str] = frozenset()
    #: What for: "room", "slot" (on a loaded replica), "load"; "" at first.
    waiting: str = ""


@attrs.frozen
class QueueStatistics:
    waiting: int
    by_model: dict[str, int]
    limit: int


@attrs.define(eq=False)
class WaitQueue:
    """Requests waiting at the gateway, a bounded line per model.

    Requests for one model wait together and are served together when the
    model is there; when room frees, the model whose first request has
    waited longest is first to take it (``blocks``).
    """

    limit: int
    lines: dict[str, list[Ticket]] = attrs.field(factory=dict)

    def full(self, model_id: str) -> bool:
        return len(self.lines.get(model_id, ())) >= self.limit

    def enter(self, model_id: str, arrived: float) -> Ticket:
        ticket = Ticket(model_id=model_id, arrived=arrived)
        self.lines.setdefault(model_id, []).append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        line = self.lines.get(ticket.model_id, [])
        if ticket in line:
            line.remove(ticket)
        if not line:
            self.lines.pop(ticket.model_id, None)

    def depth(self, model_id: str | None = None) -> int:
        if model_id is not None:
            return len(self.lines.get(model_id, ()))
        return sum(len(line) for line in self.lines.values())

    def blocks(self, model_id: str, neuron: str, arrived: float) -> bool:
        """Whether another model waited for room on ``neuron`` since before ``arrived``."""
        for other, line in self.lines.items():
            if other == model_id:
                continue
            for ticket in line:
                if neuron in ticket.wants and ticket.arrived < arrived:
                    return True
        return False

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            waiting=self.depth(),
            by_model={m: len(line) for m, line in self.lines.items()},
            limit=self.limit,
        )


@attrs.define(eq=False)
class ThrashLog:
    """Evictions, so that a reload soon after one counts as thrash, and the guard.

    A model reloaded within ``window`` seconds of its eviction is guarded for
    ``residency`` seconds: the predictive policy does not evict it again in
    that time (requests for others wait instead, and are served together).
    """

    window: float
    residency: float = 0.0
    evicted_at: dict[str, float] = attrs.field(factory=dict)
    guarded_until: dict[str, float] = attrs.field(factory=dict)
    count: int = 0

    def evicted(self, model_id: str, now: float) -> None:
        self.evicted_at[model_id] = now

    def loaded(self, model_id: str, now: float) -> bool:
        """Record a cold load; True when it reloads a model evicted within the window."""
        at = self.evicted_at.pop(model_id, None)
        thrash = at is not None and now - at <= self.window
        if thrash:
            self.count += 1
            self.guarded_until[model_id] = now + self.residency
        return thrash

    def guarded(self, model_id: str, now: float) -> bool:
        return self.guarded_until.get(model_id, -math.inf) > now


# -- policies -----------------------------------------------------------------------


@attrs.define(eq=False)
class Policy:
    """How the router picks among options; subclasses are the ``[routing] policy`` values."""

    name: ClassVar[str] = ""
    #: Requests wait in the queue when no option is open (else: 503).
    waits: ClassVar[bool] = False
    #: Added replicas are unloaded again when idle.
    scales_in: ClassVar[bool] = False

    config: GatewayConfig
    state: FleetState
    predictor: Predictor
    queue: WaitQueue
    thrash: ThrashLog

    def victim_key(self, neuron: NeuronState) -> VictimKey | None:
        """Eviction order on ``neuron`` (None: the [eviction] strategy's)."""
        return None

    def spare(self, neuron: NeuronState) -> Spare | None:
        """Models on ``neuron`` not to evict now (None: no more than the evictor spares)."""
        return None

    def loads_on(self, neuron: NeuronState, model_id: str) -> bool:
        """Whether ``model_id`` may be loaded on ``neuron``."""
        return True

    def settled(self, model_id: str, options: list[Option], ahead: int) -> bool:
        """Whether ``choose`` takes one of ``options`` (loaded, loading), whatever the loads."""
        return False

    def choose(
        self, model_id: str, options: list[Option], now: float, waited: float, ahead: int
    ) -> Decision:
        """The option to take.

        ``waited``: seconds the model's first waiting request has waited;
        ``ahead``: requests for the model waiting for a slot before this one.
        """
        raise NotImplementedError

    def pick_member(self, members: list[str]) -> str:
        """The member of a tier to route to: loaded and healthy first, in tier order."""
        for status in (LOADED, "loading"):
            for member in members:
                if any(n.status_of(member) == status for n in self.state.routable()):
                    return member
        return members[0]


@attrs.define(eq=False)
class FixedPolicy(Policy):
    """Loaded (least busy, most recent) > loading > cold load with fewest evictions."""

    name = "fixed"

    def settled(self, model_id: str, options: list[Option], ahead: int) -> bool:
        return any(o.kind in ("loaded", "loading") for o in options)

    def choose(
        self, model_id: str, options: list[Option], now: float, waited: float, ahead: int
    ) -> Decision:
        loaded = [o for o in options if o.kind == "loaded"]
        if loaded:
            return Decision(
                min(
                    loaded,
                    key=lambda o: (
                        o.neuron.busy(model_id),
                        -o.neuron.recency(model_id),
                        o.neuron.name,
                    ),
                )
            )
        loading = [o for o in options if o.kind == "loading"]
        if loading:
            return Decision(min(loading, key=lambda o: o.load is None))
        cold = [o for o in options if o.kind in ("cold", "evict")]
        if not cold:
            return Decision(None)
        entry = self.state.catalogue.models.get(model_id)
        pinned_on = entry.pinned_on if entry is not None else []

        def preference(option: Option) -> tuple[Any, ...]:
            assert option.plan is not None
            free = self.state.free_memory(option.neuron) or {}
            return (
                option.neuron.name not in pinned_on,
                len(option.plan.evictions),
                -sum(free.values()),
                option.neuron.name,
            )

        return Decision(min(cold, key=preference))


@attrs.define(eq=False)
class StaticPolicy(FixedPolicy):
    """llama-swap: each model on its home neuron, swapped in on demand (LRU), waiting."""

    name = "static"
    waits = True

    _homes: dict[str, str] | None = attrs.field(default=None, init=False)

    def homes(self) -> dict[str, str] | None:
        """model -> home neuron: biggest models first, each to the least-filled neuron."""
        if self._homes is not None:
            return self._homes
        totals = {n.name: capacity(n) for n in self.state.neurons.values()}
        if any(t is None for t in totals.values()):
            return None
        filled = dict.fromkeys(totals, 0)
        homes = {}
        models = sorted(self.state.catalogue.models.values(), key=lambda m: (-m.vram_mb, m.id))
        for model in models:
            fits = [n for n in self.state.neurons.values() if feasible(model, n)]
            if not fits:
                continue
            home = min(fits, key=lambda n: (filled[n.name] / sum(totals[n.name].values()), n.name))
            homes[model.id] = home.name
            filled[home.name] += model.vram_mb
        self._homes = homes
        return homes

    def loads_on(self, neuron: NeuronState, model_id: str) -> bool:
        homes = self.homes()
        return homes is None or homes.get(model_id, neuron.name) == neuron.name

    def victim_key(self, neuron: NeuronState) -> VictimKey | None:
        return neuron.recency


@attrs.define(eq=False)
class PredictivePolicy(Policy):
    """The smallest predicted time to first token; thrash guard; scale out and in."""

    name = "predictive"
    waits = True
    scales_in = True

    def victim_key(self, neuron: NeuronState) -> VictimKey | None:
        by_priority = self.config.eviction.strategy == "priority"

        def key(victim: str) -> tuple[int, int, float]:
            entry = self.state.catalogue.models.get(victim)
            priority = entry.priority if entry is not None and by_priority else 0
            # The least likely to be asked for again first; chances within
            # a tenth of each other are alike: least recently used first.
            idle = self.state.clock() - neuron.recency(victim)
            chance = round(10 * self.predictor.return_chance(victim, idle))
            return priority, chance, neuron.recency(victim)

        return key

    def spare(self, neuron: NeuronState) -> Spare | None:
        def spare(victim: str) -> bool:
            return bool(self.queue.depth(victim))  # its requests are waiting to be served

        return spare

    def settled(self, model_id: str, options: list[Option], ahead: int) -> bool:
        # Loads matter when nothing is loaded (unless a load is under way:
        # it is joined) or when every slot is taken (a replica may be added).
        loaded = [o for o in options if o.kind == "loaded"]
        if not loaded:
            return any(o.kind == "loading" for o in options)
        spare = sum(max(0, slots_of(o.neuron, model_id) - o.neuron.busy(model_id)) for o in loaded)
        return spare > ahead

    def choose(
        self, model_id: str, options: list[Option], now: float, waited: float, ahead: int
    ) -> Decision:
        loaded = [o for o in options if o.kind == "loaded"]
        loading = [o for o in options if o.kind == "loading"]
        loads = [o for o in options if o.kind in ("cold", "evict")]

        def rank(option: Option) -> tuple[float, int, float, str]:
            # Equal predictions: least busy, then most recently used (warm caches).
            neuron = option.neuron
            return option.predicted, neuron.busy(model_id), -neuron.recency(model_id), neuron.name

        if not loaded and loading:
            return Decision(min(loading, key=rank))
        if not loaded:
            # Rent before buying: an eviction whose penalty (the reloads it
            # will likely cause) times ``patience`` is more than the request
            # has waited yet is put off; the request waits, and others for
            # its model join it. No request waits longer than that share of
            # the penalty it spares, nor past its patience limit, and
            # meanwhile the victim may go quiet or something cheaper free up.
            patience = self.config.routing.patience
            ready = [o for o in loads if o.penalty * patience <= waited]
            if ready:
                return Decision(min(ready, key=rank))
            if not loads:
                return Decision(None)
            limit = self.hold_limit(loads)
            if waited >= limit:
                return Decision(min(loads, key=rank))
            later = min(min(o.penalty * patience for o in loads), limit) - waited
            return Decision(None, recheck=later, hold=True)
        # Requests are held here rather than queued on a neuron, so each
        # goes to the first slot that frees on any replica, new ones included.
        free = [o for o in loaded if o.neuron.busy(model_id) < slots_of(o.neuron, model_id)]
        spare_slots = sum(slots_of(o.neuron, model_id) - o.neuron.busy(model_id) for o in free)
        if spare_slots > ahead:
            return Decision(min(free, key=rank))
        expected = self.slot_wait(model_id, [o.neuron for o in loaded], ahead)
        routing = self.config.routing
        # Scale out once requests have waited scale_out_after and the wait
        # ahead is still over scale_out_wait, where a new replica is sooner.
        if loading or not loads or expected <= routing.scale_out_wait:
            return Decision(None, slot=True, expected=expected)
        if waited < routing.scale_out_after:
            return Decision(
                None, slot=True, expected=expected, recheck=routing.scale_out_after - waited
            )
        new = min(loads, key=rank)
        if new.predicted < expected:
            return Decision(new, scale_out=True)
        return Decision(None, slot=True, expected=expected)

    def hold_limit(self, loads: list[Option]) -> float:
        """Seconds patience may hold a request whose loads are ``loads``.

        Short enough that its first token, after the quickest of the loads,
        still comes within the patience limit, and the load ends well
        within ``max_wait``; then it takes the best of them, cheap or not.
        """
        quickest = min(o.predicted - o.penalty for o in loads)
        limit = min(self.patience_limit(), 0.9 * self.config.routing.max_wait)
        return max(0.0, limit - quickest)

    def patience_limit(self) -> float:
        """Seconds to first token that patience may hold a request to.

        ``patience_limit`` when set; else the slowest 1% of the requests
        patience did not hold (cold loads of big models, busy replicas):
        holding others no longer than that leaves the p99 about where it is.
        """
        limit = self.config.routing.patience_limit
        if limit is not None:
            return limit
        tail = self.predictor.observations.first_token_percentile(PATIENCE_TAIL)
        return max(PATIENCE_LIMIT_FLOOR, tail or 0.0)

    def slot_wait(self, model_id: str, replicas: list[NeuronState], ahead: int) -> float:
        """Seconds until a slot frees for a request with ``ahead`` others before it."""
        slots = sum(slots_of(n, model_id) for n in replicas)
        busy = sum(n.busy(model_id) for n in replicas) + ahead
        if busy < slots:
            return 0.0
        service = min(self.predictor.service(n, model_id) for n in replicas)
        return (busy - slots + 1) * service / slots

    def pick_member(self, members: list[str]) -> str:
        """The member with the smallest predicted time to first token; loaded ones first."""
        best: tuple[float, int] | None = None
        choice = members[0]
        for order, member in enumerate(members):
            for neuron in self.state.routable():
                status = neuron.status_of(member)
                if status == LOADED:
                    guess = self.predictor.replica_wait(neuron, member)
                elif status == "loading":
                    guess = self.predictor.load(neuron, member)
                else:
                    continue
                if best is None or (guess, order) < best:
                    best, choice = (guess, order), member
        if best is not None:
            return choice
        # Nothing loaded: the quickest to load anywhere it could go.
        return min(
            members,
            key=lambda m: (
                min(
                    (self.predictor.load(n, m) for n in self.state.routable()),
                    default=math.inf,
                ),
                members.index(m),
            ),
        )


def make_policy(
    config: GatewayConfig,
    state: FleetState,
    predictor: Predictor,
    queue: WaitQueue,
    thrash: ThrashLog,
) -> Policy:
    cls = {"predictive": PredictivePolicy, "fixed": FixedPolicy, "static": StaticPolicy}[
        config.routing.policy
    ]
    return cls(config=config, state=state, predictor=predictor, queue=queue, thrash=thrash)
