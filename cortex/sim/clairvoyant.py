"""Reference routers that know some of the future: what each piece of foresight is worth.

``python -m cortex.sim --policy clairvoyant`` (and the other names of
``CLAIRVOYANT``) replays the trace through the gateway's own router with
one change: where a request's model is not loaded, the choice of what to
evict, and whether to hold the request back first, reads how likely each
model is to be asked for soon from the replay's knowledge of the future
instead of the predictor's guesses. No gateway can run those that know the
future; they tell how far the online policies are from a router that knows
what they cannot, and so whether a target is out of reach for want of a
better rule or for want of information. The last one knows nothing of the
future and tells how far the rule itself goes.

What each knows (:class:`Knows`, kept by :class:`Sends`):

- of the sessions under way, between two turns:

  - ``next``: when each sends its next turn (its think time, drawn by the
    trace, is over);
  - ``continuation``: only whether each sends another; it is then expected
    the trace's mean think time after the answer. Where the trace draws
    think times from a memoryless distribution, as the generator does,
    that mean is the best guess of the remaining think time at any moment;
  - ``none``: what a gateway knows: when each answer ended, the share of
    answers that a further turn follows and the mean think time (both the
    trace's own, as a gateway would learn them). A session quiet for ``t``
    seconds goes on with the posterior chance ``q e^(-t/m) / (q e^(-t/m) +
    1 - q)`` (``q``: that share, ``m``: that mean), and then sends within the
    horizon with chance ``1 - e^(-HORIZON/m)``;

- of the sessions to come: when each starts (``starts``), or nothing. (Their
  rate so far, as a chance of a start within the horizon, was tried in
  place of nothing: the rule then holds more often and makes more cold
  loads, 245 against 233 for ``clairvoyant-thinks`` on seed 1.)

================================  ============  ================
``--policy``                      sessions      session starts
================================  ============  ================
``clairvoyant``                   next          known
``clairvoyant-thinks``            next          unknown
``clairvoyant-continuation``      continuation  known
``clairvoyant-none``              none          unknown
================================  ============  ================

The rule (:class:`ClairvoyantPolicy`), for a request whose model is neither
loaded nor loading (everything else is the predictive policy's), over each
model's chance of being asked for within ``HORIZON`` seconds (:meth:`Sends.chance`:
0 or 1 where the future is known):

1. victims go in the order of that chance, then of their next request,
   farthest first;
2. a load whose victims each have a chance under ``QUIET`` is taken at once,
   the one with the smallest predicted time to first token (its load and
   prompt; the predictor's eviction penalty is a guess it does without);
3. otherwise the request is held, as patience holds it, until its first
   token, after the quickest load, would come at the predictive policy's
   patience limit (the ``patience_tail`` percentile of the times to first
   token of the requests not held); then the load that evicts the fewest
   MiB times their chance is taken.

All are closed-loop only: the next send of a session depends on when its
previous turn was answered.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import statistics
from collections.abc import Sequence
from typing import ClassVar, Literal

import attrs

from cortex.gateway.evictor import VictimKey
from cortex.gateway.scheduler.policies import PolicyFactory, PredictivePolicy
from cortex.gateway.scheduler.predictor import Decision, Option
from cortex.gateway.state import NeuronState

Sessions = Literal["next", "continuation", "none"]


@attrs.frozen
class Knows:
    """What a reference knows of the sessions under way, and of those to come."""

    sessions: Sessions
    #: When each session starts.
    starts: bool


#: The sim's ``--policy`` names of the references, and what each knows.
CLAIRVOYANT: dict[str, Knows] = {
    "clairvoyant": Knows("next", starts=True),
    "clairvoyant-thinks": Knows("next", starts=False),
    "clairvoyant-continuation": Knows("continuation", starts=True),
    "clairvoyant-none": Knows("none", starts=False),
}

#: Seconds ahead within which evicting a model that will be asked for is
#: a regret (a reload to come); the generator's mean think time is 20 s.
HORIZON = 30.0
#: A model less likely than this to be asked for within ``HORIZON`` is
#: evicted without regret.
QUIET = 0.1


@attrs.frozen
class Rule:
    """The rule's constants, for searching over them (``contrib/sim/rules.py``).

    ``regret``: a victim's weight where the rule must evict what may come
    back: its MiB, or 1 (loads). ``victims``: their order, by chance, or by
    chance per MiB freed (``density``).
    """

    horizon: float = HORIZON
    quiet: float = QUIET
    regret: Literal["mib", "loads"] = "mib"
    victims: Literal["chance", "density"] = "chance"


@attrs.define
class Sends:
    """How soon each model will be asked for, as the replay lets a reference know it.

    ``think``: the mean think time of the trace's later turns; ``going_on``:
    the share of its answers that a further turn follows.
    """

    knows: Knows
    think: float
    going_on: float
    horizon: float = HORIZON
    #: model -> sorted trio times at which sessions of it start (``knows.starts``).
    _starts: dict[str, list[float]] = attrs.field(factory=dict)
    #: model -> {session: trio time of its next send}, sessions between turns
    #: (``next``, ``continuation``); or of its last answer (``none``).
    _next: dict[str, dict[int, float]] = attrs.field(factory=lambda: collections.defaultdict(dict))

    @classmethod
    def of(
        cls, knows: Knows, think_times: Sequence[float], sessions: int, horizon: float = HORIZON
    ) -> Sends:
        """For ``knows``, over a trace's think times (0 on a session's first turn) and sessions."""
        later = [t for t in think_times if t > 0]
        going_on = 1.0 - sessions / len(think_times) if think_times else 0.0
        return cls(knows, statistics.fmean(later) if later else 0.0, going_on, horizon)

    def start(self, model: str, at: float) -> None:
        """A session will send its first request, for ``model``, at trio time ``at``."""
        if self.knows.starts:
            bisect.insort(self._starts.setdefault(model, []), at)

    def sending(self, session: int, model: str, at: float) -> None:
        """Session ``session`` sends a request for ``model`` now (trio time ``at``)."""
        self._next[model].pop(session, None)

    def answered(self, session: int, model: str, at: float, think: float | None) -> None:
        """Session ``session`` got an answer from ``model`` at trio time ``at``.

        ``think``: the seconds it thinks before its next turn (known only
        to a reference that knows ``next``); None: that was its last.
        """
        if self.knows.sessions == "none":
            self._next[model][session] = at
        elif think is not None:
            known = self.knows.sessions == "next"
            self._next[model][session] = at + (think if known else self.think)

    def next_send(self, model: str, now: float) -> float:
        """The soonest trio time after ``now`` a request for ``model`` is known to be sent.

        inf: none known (``none`` knows no sends).
        """
        starts = self._starts.get(model, [])
        index = bisect.bisect_left(starts, now)
        soonest = starts[index] if index < len(starts) else math.inf
        pending = self._next.get(model)
        if pending and self.knows.sessions != "none":
            # A session whose think time is over is about to send (its turn
            # is on its way); it counts as now.
            soonest = min(soonest, max(now, min(pending.values())))
        return soonest

    def chance(self, model: str, now: float) -> float:
        """How likely a request for ``model`` is sent within ``horizon`` seconds of ``now``."""
        if self.knows.sessions != "none":
            return float(self.next_send(model, now) - now < self.horizon)
        quiet = 1.0
        pending = self._next.get(model, {}) if self.think > 0 else {}
        within = 1.0 - math.exp(-self.horizon / self.think) if pending else 0.0
        for answered in pending.values():
            # The posterior chance it goes on, quiet since its answer; then
            # that its next turn comes within the horizon.
            decay = self.going_on * math.exp(-(now - answered) / self.think)
            quiet *= 1.0 - within * decay / (decay + 1.0 - self.going_on)
        return 1.0 - quiet


@attrs.define(eq=False)
class ClairvoyantPolicy(PredictivePolicy):
    """The predictive policy, evicting and holding by the replay's knowledge of future sends."""

    name: ClassVar[str] = "clairvoyant"

    sends: Sends = attrs.field(kw_only=True)
    rule: Rule = attrs.field(factory=Rule, kw_only=True)

    def _mib(self, model_id: str) -> int:
        models = self.state.catalogue.models
        return models[model_id].vram_mb if model_id in models else 1

    def victim_key(self, neuron: NeuronState, now: float) -> VictimKey | None:
        per = self._mib if self.rule.victims == "density" else lambda _: 1
        return lambda victim: (
            self.sends.chance(victim, now) / per(victim),
            -self.sends.next_send(victim, now),
        )

    def regret(self, option: Option, now: float) -> float:
        """What the option evicts: each victim's MiB (or 1) times its chance of coming back soon."""
        assert option.plan is not None
        weight = self._mib if self.rule.regret == "mib" else lambda _: 1
        return sum(weight(v) * self.sends.chance(v, now) for v in option.plan.evictions)

    def choose(
        self, model_id: str, options: list[Option], now: float, waited: float, ahead: int
    ) -> Decision:
        if any(o.kind in ("loaded", "loading") for o in options):
            return super().choose(model_id, options, now, waited, ahead)
        loads = [o for o in options if o.kind in ("cold", "evict")]
        if not loads:
            return Decision(None)
        assert all(o.plan is not None for o in loads)
        free = [
            o
            for o in loads
            if all(self.sends.chance(v, now) < self.rule.quiet for v in o.plan.evictions)  # type: ignore[union-attr]
        ]
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


def factory(sends: Sends, rule: Rule | None = None) -> PolicyFactory:
    """A ``Router`` policy factory that builds the clairvoyant policy over ``sends``."""
    return functools.partial(ClairvoyantPolicy, sends=sends, rule=rule or Rule())
