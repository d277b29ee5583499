"""A reference router that knows when each session sends next: what foresight is worth.

``python -m cortex.sim --policy clairvoyant`` (and ``clairvoyant-continuation``)
replays the trace through the gateway's own router with one change: where
a request's model is not loaded, the choice of what to evict, and whether
to hold the request back first, reads the replay's knowledge of the future
instead of the predictor's guesses. No gateway can run it; it tells how far
the online policies are from a router that knows what they cannot, and so
whether a target is out of reach for want of a better rule or for want of
information.

What it knows (:class:`Sends`), per model, the soonest moment a request
for it will be sent:

- ``clairvoyant``: exactly. Sessions not yet started send at their time in
  the trace; a session between two turns sends its next turn when its
  think time, drawn by the trace, is over.
- ``clairvoyant-continuation``: only whether a session goes on after the
  answer it is waiting for; its next turn is then expected the trace's mean
  think time after that answer. Where the trace draws think times from a
  memoryless distribution, as the generator does, that mean is the best
  guess of the remaining think time at any moment, so this is the most a
  router could know that knew how many turns each session has left.

The rule (:class:`ClairvoyantPolicy`), for a request whose model is neither
loaded nor loading (everything else is the predictive policy's):

1. victims go in the order of their next request, farthest first;
2. a load that evicts nothing asked for within ``HORIZON`` seconds is taken
   at once, the one with the smallest predicted time to first token (its
   load and prompt; the predictor's eviction penalty is a guess it does
   without);
3. otherwise the request is held, as patience holds it, until its first
   token, after the quickest load, would come at the predictive policy's
   patience limit (the ``patience_tail`` percentile of the times to first
   token of the requests not held); then the load that evicts the fewest
   MiB asked for within the horizon is taken.

Both are closed-loop only: the next send of a session depends on when its
previous turn was answered.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import statistics
from typing import ClassVar, Literal

import attrs

from cortex.gateway.evictor import VictimKey
from cortex.gateway.scheduler.policies import PolicyFactory, PredictivePolicy
from cortex.gateway.scheduler.predictor import Decision, Option
from cortex.gateway.state import NeuronState

Knows = Literal["next", "continuation"]

#: The sim's ``--policy`` names of the references, and what each knows.
CLAIRVOYANT: dict[str, Knows] = {
    "clairvoyant": "next",
    "clairvoyant-continuation": "continuation",
}

#: Seconds ahead within which evicting a model that will be asked for is
#: a regret (a reload to come); the generator's mean think time is 20 s.
HORIZON = 30.0


@attrs.define
class Sends:
    """When each model is next asked for, as the replay knows it (trio times).

    ``starts``: the trio time each session of the trace starts, with its
    model; ``think``: the mean think time used where only continuation is
    known.
    """

    knows: Knows
    think: float
    #: model -> sorted trio times at which sessions of it start.
    _starts: dict[str, list[float]] = attrs.field(factory=dict)
    #: model -> {session: trio time of its next send}, sessions between turns.
    _next: dict[str, dict[int, float]] = attrs.field(factory=lambda: collections.defaultdict(dict))

    @classmethod
    def of(cls, knows: Knows, think_times: list[float]) -> Sends:
        """For ``knows``, with the mean of the trace's think times (of turns after the first)."""
        later = [t for t in think_times if t > 0]
        return cls(knows, statistics.fmean(later) if later else 0.0)

    def start(self, model: str, at: float) -> None:
        """A session will send its first request, for ``model``, at trio time ``at``."""
        bisect.insort(self._starts.setdefault(model, []), at)

    def sending(self, session: int, model: str, at: float) -> None:
        """Session ``session`` sends a request for ``model`` now (trio time ``at``)."""
        self._next[model].pop(session, None)

    def answered(self, session: int, model: str, at: float, think: float) -> None:
        """Session ``session`` got an answer at trio time ``at`` and goes on with ``model``.

        ``think``: the seconds it thinks before its next turn (known only
        to a router that knows ``next``).
        """
        self._next[model][session] = at + (think if self.knows == "next" else self.think)

    def next_send(self, model: str, now: float) -> float:
        """The soonest trio time after ``now`` a request for ``model`` is sent (inf: never)."""
        starts = self._starts.get(model, [])
        index = bisect.bisect_left(starts, now)
        soonest = starts[index] if index < len(starts) else math.inf
        pending = self._next.get(model)
        if pending:
            # A session whose think time is over is about to send (its turn
            # is on its way); it counts as now.
            soonest = min(soonest, max(now, min(pending.values())))
        return soonest


@attrs.define(eq=False)
class ClairvoyantPolicy(PredictivePolicy):
    """The predictive policy, evicting and holding by the replay's knowledge of future sends."""

    name: ClassVar[str] = "clairvoyant"

    sends: Sends = attrs.field(kw_only=True)

    def victim_key(self, neuron: NeuronState, now: float) -> VictimKey | None:
        return lambda victim: -self.sends.next_send(victim, now)

    def regret(self, option: Option, now: float) -> int:
        """MiB the option evicts of models asked for within ``HORIZON`` seconds."""
        assert option.plan is not None
        models = self.state.catalogue.models
        return sum(
            models[victim].vram_mb if victim in models else 1
            for victim in option.plan.evictions
            if self.sends.next_send(victim, now) - now < HORIZON
        )

    def choose(
        self, model_id: str, options: list[Option], now: float, waited: float, ahead: int
    ) -> Decision:
        if any(o.kind in ("loaded", "loading") for o in options):
            return super().choose(model_id, options, now, waited, ahead)
        loads = [o for o in options if o.kind in ("cold", "evict")]
        if not loads:
            return Decision(None)
        free = [o for o in loads if not self.regret(o, now)]
        if free:
            return Decision(min(free, key=lambda o: (o.predicted - o.penalty, o.neuron.name)))
        quickest = min(o.predicted - o.penalty for o in loads)
        limit = min(self.patience_limit(), 0.9 * self.config.routing.max_wait)
        if waited + quickest >= limit:
            return Decision(
                min(
                    loads,
                    key=lambda o: (self.regret(o, now), o.predicted - o.penalty, o.neuron.name),
                )
            )
        return Decision(None, recheck=min(1.0, limit - waited - quickest), hold=True)


def factory(sends: Sends) -> PolicyFactory:
    """A ``Router`` policy factory that builds the clairvoyant policy over ``sends``."""
    return functools.partial(ClairvoyantPolicy, sends=sends)
