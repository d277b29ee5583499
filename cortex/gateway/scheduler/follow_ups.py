"""Follow-ups: the request that an answer calling a tool makes nearly certain.

An agent (Claude Code, an IDE agent) works in a loop: the model answers
with a tool call, the client runs the tool (a grep, a file read: seconds; a
build: a minute or more) and sends the same conversation again with the
tool's result. Evicting the model in between costs that next request a
reload and the re-processing of the whole, long, agent prompt.

The proxy tells the router when an answer called a tool (OpenAI
``finish_reason: "tool_calls"``, a Responses ``function_call`` output item;
Anthropic's ``tool_use`` arrives as the former, translated):
``Router.release(..., follows=True)`` then ``expect`` s a follow-up of that
conversation on that replica. The next request of the conversation
``arrived`` clears it:

- the same session key (``Prompt.session``), when the answer's request had one;
- else the prompt that holds the most of the answer's prompt blocks, at
  least those inside its messages (``Prompt.repeated``; where they are not
  known, ``MATCH_SHARE`` of them: ``least_shared``): the rest follow the
  messages in the body, as a chat body's ``tools`` do, and may change with
  each turn. Sessions of one kind share their system prompt, but their
  messages differ after it. ``Affinity`` finds a keyless turn's
  conversation by the same rule;
- an answer whose prompt the router did not see, or too short to index,
  is answered by the next request for its model.

While one is ``pending`` the predictor counts the model as certain to
return (``Predictor.penalty``: its reload and its prompt caches in full)
and the predictive policy evicts it last. That lasts ``window`` seconds
after the answer: the ``FOLLOW_UP_PERCENTILE`` of the gaps measured between
answers and their follow-ups (``Observations.follow_up_window``; a prior
until enough came), at most ``[routing] follow_up_limit``. A follow-up that
comes later than the window is still recognised and its gap learned, up to
the limit, so a fleet whose tools run long learns a longer window; past the
limit it has ``expired``.

Reads (``pending``, ``sessions``, ``window``) change nothing: ``decide``
stays a pure function of what it is given, ``now`` included. The router
calls ``arrived`` and ``expire`` itself.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from cortex.gateway.scheduler.observations import Observations
from cortex.harness import common_prefix

if TYPE_CHECKING:
    # affinity imports this package: a runtime import would be a cycle.
    from cortex.gateway.affinity import Prompt

#: A prompt without the answer's session key answers it when it holds at
#: least this share of the answer's prompt blocks.
MATCH_SHARE = 0.75


def least_shared(blocks: int) -> int:
    """Leading blocks a prompt shares with an earlier one ``blocks`` long to continue it.

    ``MATCH_SHARE`` of them, rounded up: the rule that matches a follow-up
    to its answer here and a keyless turn to its conversation in
    ``Affinity``.
    """
    return math.ceil(MATCH_SHARE * blocks)


#: Follow-ups expected at once, the oldest dropped (as expired) beyond.
MAX_FOLLOW_UPS = 16384
#: The ``result`` labels of ``cortex_follow_ups_total``: the follow-up came
#: within the window with the model still loaded where the answer came
#: from, or with it gone; came after the window; never came.
RESULTS = ("kept", "evicted", "late", "expired")


@attrs.frozen
class FollowUp:
    """An answer that called a tool, its follow-up not come yet."""

    neuron: str
    model_id: str
    #: trio time of the answer's end.
    since: float
    #: The answer's request's session key and prompt blocks.
    session: str | None = None
    blocks: tuple[bytes, ...] = ()
    #: Bytes of that prompt (0: not seen).
    size: int = 0
    #: Of ``blocks``, those its follow-up repeats (``Prompt.repeated``).
    repeated: int = 0

    @property
    def anonymous(self) -> bool:
        """Nothing tells its conversation apart: the next request for the model answers it."""
        return self.session is None and not self.blocks


@attrs.frozen
class FollowUpStatistics:
    pending: int
    kept: int
    evicted: int
    late: int
    expired: int


@attrs.define(eq=False)
class FollowUps:
    """The follow-ups expected, per model; what became of the others."""

    observations: Observations
    #: ``[routing] follow_up_limit``: seconds a follow-up is waited for at most.
    limit: float = 300.0
    #: ``[routing] follow_ups``: False, nothing is expected.
    enabled: bool = True
    #: model -> its follow-ups expected, oldest first.
    _expected: dict[str, list[FollowUp]] = attrs.field(factory=dict, init=False)
    _counts: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    def window(self) -> float:
        """Seconds after its answer that a follow-up keeps its model (learned, capped)."""
        return self.observations.follow_up_window(self.limit)

    def expect(self, neuron: str, model_id: str, prompt: Prompt | None, now: float) -> bool:
        """The answer to ``prompt`` from ``neuron`` at ``now`` called a tool.

        Returns True when the oldest follow-up expected was dropped to make
        room (``MAX_FOLLOW_UPS``; counted as expired).
        """
        if not self.enabled or self.limit <= 0:
            return False
        if prompt is None:
            found = FollowUp(neuron, model_id, now)
        else:
            found = FollowUp(
                neuron,
                model_id,
                now,
                prompt.session,
                prompt.blocks,
                prompt.size,
                prompt.repeated if prompt.blocks else 0,
            )
        self._expected.setdefault(model_id, []).append(found)
        if sum(len(v) for v in self._expected.values()) > MAX_FOLLOW_UPS:
            oldest = min(self._expected, key=lambda m: self._expected[m][0].since)
            self._drop(oldest, 0)
            self._counts["expired"] += 1
            return True
        return False

    def pending(self, neuron: str, model_id: str, now: float) -> bool:
        """Whether a follow-up of an answer from ``model_id`` there is expected at ``now``."""
        expected = self._expected.get(model_id)
        if not expected:
            return False
        window = self.window()
        return any(f.neuron == neuron and now - f.since < window for f in expected)

    def expected(self, neuron: str, model_id: str, now: float) -> list[FollowUp]:
        """The follow-ups expected there at ``now`` whose prompts were seen."""
        expected = self._expected.get(model_id)
        if not expected:
            return []
        window = self.window()
        return [f for f in expected if f.neuron == neuron and now - f.since < window and f.size]

    def arrived(
        self,
        model_id: str,
        prompt: Prompt | None,
        now: float,
        loaded: Callable[[str], bool],
    ) -> str | None:
        """A request for ``model_id`` came at ``now``: the follow-up it answers goes.

        ``loaded(neuron)``: whether the model is still loaded there. Learns
        the gap. Returns the follow-up's result (``RESULTS``), None when the
        request answers none.
        """
        expected = self._expected.get(model_id)
        if not expected:
            return None
        at = self._match(expected, prompt)
        if at is None:
            return None
        found = expected[at]
        self._drop(model_id, at)
        gap = now - found.since
        result = "late"
        if gap < self.window():
            result = "kept" if loaded(found.neuron) else "evicted"
        self.observations.record_follow_up(gap)
        self._counts[result] += 1
        return result

    def expire(self, now: float) -> int:
        """Forget the follow-ups waited for ``limit`` seconds; how many there were."""
        gone = 0
        for model_id in list(self._expected):
            expected = self._expected[model_id]
            while expected and now - expected[0].since >= self.limit:
                self._drop(model_id, 0)
                gone += 1
                if model_id not in self._expected:
                    break
        self._counts["expired"] += gone
        return gone

    def statistics(self) -> FollowUpStatistics:
        return FollowUpStatistics(
            pending=sum(len(v) for v in self._expected.values()),
            kept=self._counts["kept"],
            evicted=self._counts["evicted"],
            late=self._counts["late"],
            expired=self._counts["expired"],
        )

    def _match(self, expected: list[FollowUp], prompt: Prompt | None) -> int | None:
        """The index in ``expected`` of the follow-up ``prompt`` answers (None: none)."""
        if prompt is not None and prompt.session is not None:
            for at, f in enumerate(expected):
                if f.session == prompt.session:
                    return at
        elif prompt is not None and prompt.blocks:
            best, most = None, 0
            for at, f in enumerate(expected):
                if f.session is None and f.blocks:
                    shared = common_prefix(f.blocks, prompt.blocks)
                    if shared > most and shared >= f.repeated:
                        best, most = at, shared
            if best is not None:
                return best
        for at, f in enumerate(expected):
            if f.anonymous:
                return at
        return None

    def _drop(self, model_id: str, at: int) -> None:
        expected = self._expected[model_id]
        del expected[at]
        if not expected:
            del self._expected[model_id]
