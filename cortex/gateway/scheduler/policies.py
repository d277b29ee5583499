"""How the router picks among options: the ``[routing] policy`` values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from cortex.config import GatewayConfig
from cortex.gateway.evictor import Spare, VictimKey
from cortex.gateway.scheduler.observations import (
    PATIENCE_LIMIT_FLOOR,
)
from cortex.gateway.scheduler.predictor import Decision, Option, Predictor, slots_of
from cortex.gateway.scheduler.queue import WaitQueue
from cortex.gateway.scheduler.thrash import ThrashLog
from cortex.gateway.state import (
    LOADED,
    FleetState,
    NeuronState,
    capacity,
    feasible,
)

POLICIES = ("predictive", "fixed", "static")


#: A request waits for a slot on the saturated replica holding its prompt
#: only when that is predicted to take under this share of the time the
#: best free replica would take (processing the whole prompt there).
HOME_WAIT_SHARE = 0.5


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

    def victim_key(self, neuron: NeuronState, now: float) -> VictimKey | None:
        """Eviction order on ``neuron`` at trio time ``now`` (None: the [eviction] strategy's)."""
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
                if any(
                    n.status_of(member) == status and member not in n.stalled
                    for n in self.state.routable()
                ):
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

    def victim_key(self, neuron: NeuronState, now: float) -> VictimKey | None:
        return neuron.recency


@attrs.define(eq=False)
class PredictivePolicy(Policy):
    """The smallest predicted time to first token; thrash guard; scale out and in."""

    name = "predictive"
    waits = True
    scales_in = True

    def victim_key(self, neuron: NeuronState, now: float) -> VictimKey | None:
        by_priority = self.config.eviction.strategy == "priority"

        def key(victim: str) -> tuple[int, bool, int, float]:
            entry = self.state.catalogue.models.get(victim)
            priority = entry.priority if entry is not None and by_priority else 0
            # A model whose tool call's result is on its way goes last;
            # then the least likely to be asked for again first; chances
            # within a tenth of each other are alike: least recently used
            # first. The prompt cache it holds counts as that many reloads more.
            following = self.predictor.following(neuron, victim, now)
            chance = self.predictor.chance(neuron, victim, now)
            chance += self.predictor.cache_cost(neuron, victim, now) / self.predictor.load(
                neuron, victim
            )
            return priority, following, round(10 * chance), neuron.recency(victim)

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
            ready = [o for o in loads if o.hold(patience) <= waited]
            if ready:
                return Decision(min(ready, key=rank))
            if not loads:
                return Decision(None)
            limit = self.hold_limit(loads)
            if waited >= limit:
                return Decision(min(loads, key=rank))
            later = min(min(o.hold(patience) for o in loads), limit) - waited
            return Decision(None, recheck=later, hold=True)
        # Requests are held here rather than queued on a neuron, so each
        # goes to the first slot that frees on any replica, new ones included.
        free = [o for o in loaded if o.neuron.busy(model_id) < slots_of(o.neuron, model_id)]
        spare_slots = sum(slots_of(o.neuron, model_id) - o.neuron.busy(model_id) for o in free)
        if spare_slots > ahead:
            best = min(free, key=rank)
            # A saturated replica that holds the prompt (session affinity
            # folded in) may still be sooner than processing it elsewhere:
            # then wait for a slot there. Its slot wait is a guess (a slot
            # frees when a request ends), so waiting must save at least half.
            full = [o for o in loaded if o not in free]
            home = min(full, key=rank, default=None)
            if home is not None and home.predicted < HOME_WAIT_SHARE * best.predicted:
                return Decision(None, slot=True, expected=home.predicted)
            return Decision(best)
        # A slot there still leaves the prompt to process (what the replicas
        # hold of it spared), as a new replica's load does the whole prompt.
        expected = self.slot_wait(model_id, [o.neuron for o in loaded], ahead)
        expected += min(o.prefill for o in loaded)
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

        ``patience_limit`` when set; else the ``patience_tail`` percentile
        of the times to first token of the requests patience did not hold
        (cold loads of big models, busy replicas), the 99th by default:
        held requests then come no later than the slowest 1% of the others
        and the p99 stays about where it is. But they crowd just under it,
        and what holding costs the rest (requests wait for room behind the
        loads it delays) lifts it: on the generator's traces
        ``patience = 30`` ends above ``fixed``'s p99 on two seeds in five;
        held to the 97th percentile, on none.
        """
        routing = self.config.routing
        if routing.patience_limit is not None:
            return routing.patience_limit
        tail = self.predictor.observations.first_token_percentile(routing.patience_tail)
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
                if member in neuron.stalled:
                    continue
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


#: Builds a router's policy: ``make_policy``, or a simulator's reference policy.
PolicyFactory = Callable[[GatewayConfig, FleetState, Predictor, WaitQueue, ThrashLog], "Policy"]


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
