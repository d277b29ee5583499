"""Options, decisions, and the time-to-first-token predictions behind them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import attrs

from cortex.gateway.evictor import Plan
from cortex.gateway.scheduler.follow_ups import FollowUp, FollowUps
from cortex.gateway.scheduler.observations import (
    GUARD_FACTOR,
    REPLICA_PENALTY,
    RETURN_HORIZON,
    UNKNOWN_SIZE_MB,
    UNLOAD_S,
    Observations,
)
from cortex.gateway.scheduler.thrash import ThrashLog
from cortex.gateway.state import (
    LOADED,
    FleetState,
    NeuronState,
    PendingLoad,
)

Kind = Literal["loaded", "loading", "cold", "evict"]
#: Expected seconds of prompt processing that unloading a model from a
#: neuron throws away (its prompt cache for sessions still going on), given
#: the (session key, prompt bytes) of the follow-ups expected there, whose
#: prompts count in full.
CacheCost = Callable[[NeuronState, str, Sequence[FollowUp]], float]


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
    #: The part of ``predicted`` that is the evictions' penalty ...
    penalty: float = 0.0
    #: ... and of that, the prompt caches they throw away (``Predictor.cache_cost``).
    caches: float = 0.0
    #: The part of ``predicted`` that is the prompt processing still to do
    #: (``Affinity.fold``; 0 without affinity).
    prefill: float = 0.0

    def hold(self, patience: float) -> float:
        """Seconds a request should have waited before taking this option.

        ``patience`` times its reload penalty; and the prompt caches it
        throws away in full: waiting that long for something cheaper to
        free costs the request no more than taking it now costs the
        sessions it evicts (rent before buying, whatever ``patience``).
        """
        return (self.penalty - self.caches) * patience + self.caches


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
    #: No route, no slot, no hold: the neurons to wait for room on (set by
    #: ``decide``; an older waiter for room there keeps newer ones out).
    wants: frozenset[str] = frozenset()


@attrs.define(eq=False)
class Predictor:
    """Time-to-first-token predictions over the fleet state and the observations."""

    state: FleetState
    observations: Observations
    #: Seconds after which an idle model is as good as gone (the thrash window).
    horizon: float = 600.0
    #: Guarded models (they thrashed lately) cost this many times their reload.
    thrash: ThrashLog | None = None
    #: What an eviction throws away of the prompt caches
    #: (``Affinity.eviction_cost``); None: nothing counted.
    caches: CacheCost | None = None
    #: The follow-ups expected of answers that called a tool; None: none.
    follow_ups: FollowUps | None = None

    def size(self, model_id: str) -> int:
        entry = self.state.entry(model_id)
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

    def return_chance(self, model_id: str, idle: float, now: float) -> float:
        """How likely ``model_id`` is asked for within ``RETURN_HORIZON`` seconds of ``now``.

        Either its current session goes on (likely while it has been idle for
        less than a few of its usual gaps) or a new one starts (as often as
        sessions of it have been starting).
        """
        gap = self.observations.mean_interarrival(model_id)
        scale = min(max(3.0 * gap, 30.0), self.horizon) if gap is not None else 60.0
        # A horizon of 0 (thrash_window = 0): an idle model is as good as gone.
        going_on = math.exp(-max(idle, 0.0) / scale) if scale > 0 else 0.0
        between = self.observations.session_gap(model_id, now)
        new = 1.0 - math.exp(-RETURN_HORIZON / between) if between else 0.0
        return 1.0 - (1.0 - going_on) * (1.0 - new)

    def following(self, neuron: NeuronState, victim: str, now: float) -> bool:
        """Whether a follow-up of an answer that called a tool is expected of ``victim`` there."""
        return self.follow_ups is not None and self.follow_ups.pending(neuron.name, victim, now)

    def chance(self, neuron: NeuronState, victim: str, now: float) -> float:
        """``return_chance`` of ``victim`` there at ``now``; 1 while a follow-up is expected."""
        if self.following(neuron, victim, now):
            return 1.0
        idle = self.state.clock() - neuron.recency(victim)
        return self.return_chance(victim, idle, now)

    def cache_cost(self, neuron: NeuronState, victim: str, now: float | None = None) -> float:
        """Expected seconds of prompt processing that evicting ``victim`` from ``neuron`` costs.

        The sessions it holds the prompts of re-prefill them wherever they
        go next, another replica or not: unlike a reload, this is not shared.
        Given ``now``, the prompts of follow-ups expected there count in full.
        """
        if self.caches is None:
            return 0.0
        expected: list[FollowUp] = []
        if self.follow_ups is not None and now is not None:
            expected = self.follow_ups.expected(neuron.name, victim, now)
        return self.caches(neuron, victim, expected)

    def penalty(self, neuron: NeuronState, victim: str, now: float) -> float:
        """Expected seconds that evicting ``victim`` from ``neuron`` now costs later.

        Its reload, times the chance it is asked for again (1 while a
        follow-up is expected; a tenth of that when another replica holds
        it, where the follow-up can go without waiting for a load), plus the
        prompt cache it throws away.
        """
        cost = self.chance(neuron, victim, now) * self.load(neuron, victim)
        if self.thrash is not None and self.thrash.guarded(victim, now):
            cost *= GUARD_FACTOR
        others = any(
            n is not neuron and n.routable and n.status_of(victim) == LOADED
            for n in self.state.neurons.values()
        )
        reload = cost * REPLICA_PENALTY if others else cost
        return reload + self.cache_cost(neuron, victim, now)

    def cold(
        self, neuron: NeuronState, model_id: str, plan: Plan, now: float
    ) -> tuple[float, float]:
        """(predicted seconds, of which penalty) for loading after ``plan``'s evictions."""
        penalty = sum(self.penalty(neuron, v, now) for v in plan.evictions)
        return self.load(neuron, model_id) + UNLOAD_S * len(plan.evictions) + penalty, penalty
