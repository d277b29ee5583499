"""Follow-ups: an answer that called a tool keeps its model until the tool's result comes.

Plain functions over a fleet state built here (``scheduler.decide``, the
``FollowUps`` the router keeps), then a seeded replay in ``cortex.sim``
(``tests/test_sim.py`` has the trace side).
"""

from __future__ import annotations

import math

import pytest

from cortex.config import CatalogModel
from cortex.gateway import scheduler
from cortex.gateway.affinity import BYTES_PER_TOKEN, Prompt
from cortex.gateway.scheduler import (
    FOLLOW_UP_ENOUGH,
    MATCH_SHARE,
    PRIOR_FOLLOW_UP_S,
    FollowUps,
    Observations,
    Policy,
    Request,
)
from cortex.sim.replay import replay
from cortex.sim.report import Row, sessions_table
from tests.test_cache_eviction import agents_trace, build, caching
from tests.test_decide import policy
from tests.test_scheduling import GIB, gpu

#: trio time of the decisions here.
T = 1000.0

AGENT = CatalogModel(id="agent", vram_mb=8 * GIB)
OTHER = CatalogModel(id="other", vram_mb=8 * GIB)
NEW = CatalogModel(id="new", vram_mb=8 * GIB)


def blocks(*names: str) -> tuple[bytes, ...]:
    return tuple(name.encode() for name in names)


def conversation(session: str | None, *names: str) -> Prompt:
    return Prompt(session=session, blocks=blocks(*names), size=2048 * len(names))


def victims(p: Policy, now: float) -> list[str]:
    """What a request for ``new`` evicts at trio time ``now``."""
    decision = scheduler.decide(p.state, Request("new", now), now=now, policy=p, queue=p.queue)
    assert decision.route is not None and decision.route.plan is not None
    assert decision.route.kind == "evict"
    return decision.route.plan.evictions


def test_a_model_whose_tool_result_is_coming_is_evicted_last() -> None:
    # No room for "new": "agent" idle 200 s is likelier gone than "other", idle 20 s.
    a = gpu("a", 16 * GIB, ("agent", 8 * GIB, 200), ("other", 8 * GIB, 20))
    p = policy(a, models=[AGENT, OTHER, NEW])
    follow_ups = p.predictor.follow_ups
    assert follow_ups is not None
    assert victims(p, T) == ["agent"]
    assert p.predictor.penalty(a, "agent", T) < 0.1 * p.predictor.load(a, "agent")
    # Its answer, 5 s ago, called a tool: the other goes.
    agent = conversation("s1", "system", "task")
    follow_ups.expect("a", "agent", agent, T - 5)
    assert victims(p, T) == ["other"]
    # Evicting it would cost its whole reload.
    assert p.predictor.penalty(a, "agent", T) == pytest.approx(p.predictor.load(a, "agent"))
    # Once the window (the prior: nothing measured yet) has passed, it is a victim again.
    assert follow_ups.window() == PRIOR_FOLLOW_UP_S
    assert victims(p, T - 5 + PRIOR_FOLLOW_UP_S - 0.1) == ["other"]
    assert victims(p, T - 5 + PRIOR_FOLLOW_UP_S) == ["agent"]
    # And once the result has come.
    assert follow_ups.arrived("agent", agent, T, loaded=lambda _: True) == "kept"
    assert victims(p, T) == ["agent"]


def test_a_follow_up_is_a_weight_not_a_pin() -> None:
    # The only model there: a request that needs the room still evicts it.
    a = gpu("a", 8 * GIB, ("agent", 8 * GIB, 1))
    p = policy(a, models=[AGENT, NEW])
    assert p.predictor.follow_ups is not None
    p.predictor.follow_ups.expect("a", "agent", None, T)
    assert victims(p, T) == ["agent"]


def test_with_follow_ups_off_nothing_is_expected() -> None:
    a = gpu("a", 16 * GIB, ("agent", 8 * GIB, 200), ("other", 8 * GIB, 20))
    p = policy(a, models=[AGENT, OTHER, NEW], follow_ups=False)
    assert p.predictor.follow_ups is not None
    assert not p.predictor.follow_ups.expect("a", "agent", None, T - 5)
    assert victims(p, T) == ["agent"]
    assert p.predictor.follow_ups.statistics().pending == 0


def test_the_sessions_prompt_counts_in_full_while_its_result_is_coming() -> None:
    a = caching(gpu("a", 16 * GIB, ("agent", 8 * GIB, 100)), "agent")
    p, affinity, clock = build(a, models=[AGENT])
    follow_ups = p.predictor.follow_ups
    assert follow_ups is not None
    tokens = 10_000
    agent = Prompt(session="s1", blocks=(), size=int(tokens * BYTES_PER_TOKEN))
    stranger = Prompt(session=None, blocks=blocks("x", "y"), size=int(2_000 * BYTES_PER_TOKEN))
    affinity.routed("agent", agent, "a")
    clock.now += 100  # idle 100 s against the 30 s floor of the scale
    full = affinity.prefill_seconds(a, "agent", tokens)
    assert p.predictor.cache_cost(a, "agent", T) == pytest.approx(full * math.exp(-100 / 30))
    follow_ups.expect("a", "agent", agent, T - 1)
    follow_ups.expect("a", "agent", stranger, T - 1)  # a prompt the affinity has no session of
    assert p.predictor.cache_cost(a, "agent", T) == pytest.approx(
        full + affinity.prefill_seconds(a, "agent", 2_000)
    )
    # Without ``now`` (no follow-ups asked about) the weighing is the usual one.
    assert p.predictor.cache_cost(a, "agent") == pytest.approx(full * math.exp(-100 / 30))


def test_the_next_request_of_the_conversation_answers_it() -> None:
    follow_ups = FollowUps(Observations())
    # Two sessions of one kind share their system prompt (three blocks of eight).
    mine = conversation(None, "sys", "sys2", "sys3", "doc-1", "a", "b", "c", "d")
    follow_ups.expect("a", "agent", mine, T)
    follow_ups.expect("a", "agent", conversation("k1", "sys"), T)
    follow_ups.expect("b", "agent", None, T)
    follow_ups.expect("a", "other", mine, T)

    def loaded(neuron: str) -> bool:
        return True

    # Another session of the same kind, no key: not enough in common.
    other = conversation(None, "sys", "sys2", "sys3", "doc-2", "a", "b", "c", "d", "e")
    assert MATCH_SHARE * 8 > 3
    # ... answers the one that said nothing of itself (no prompt).
    assert follow_ups.arrived("agent", other, T + 1, loaded) == "kept"
    assert not follow_ups.pending("b", "agent", T + 1)
    assert follow_ups.pending("a", "agent", T + 1)
    assert follow_ups.arrived("agent", other, T + 1, loaded) is None
    # The keyed one by its key alone, whatever its prompt.
    assert follow_ups.arrived("agent", conversation("k1", "zzz"), T + 2, loaded) == "kept"
    # Its own next turn: its prompt, the answer and the tool result after
    # (the last block differs: what follows the messages in the body).
    follow = conversation(None, "sys", "sys2", "sys3", "doc-1", "a", "b", "c", "tools", "more")
    assert follow_ups.arrived("agent", follow, T + 3, loaded) == "kept"
    assert not follow_ups.pending("a", "agent", T + 3)
    # The same conversation on another model is another follow-up.
    assert follow_ups.pending("a", "other", T + 3)
    assert follow_ups.statistics().pending == 1
    assert sorted(follow_ups.observations.follow_up_gaps) == [1.0, 2.0, 3.0]


def test_the_window_is_learned_from_the_gaps_and_capped() -> None:
    observations = Observations()
    follow_ups = FollowUps(observations, limit=100.0)
    for n in range(FOLLOW_UP_ENOUGH - 1):
        follow_ups.expect("a", "m", None, T)
        assert follow_ups.arrived("m", None, T + 1 + n, lambda _: True) == "kept"
    assert follow_ups.window() == PRIOR_FOLLOW_UP_S  # not enough measured yet
    follow_ups.expect("a", "m", None, T)
    follow_ups.arrived("m", None, T + FOLLOW_UP_ENOUGH, lambda _: True)
    # The 99th percentile of gaps 1 .. 20 s.
    assert follow_ups.window() == FOLLOW_UP_ENOUGH
    # One later than the window is late, and still learned: the window grows.
    follow_ups.expect("a", "m", None, T)
    assert follow_ups.arrived("m", None, T + 90, lambda _: True) == "late"
    assert follow_ups.window() == 90
    # The limit caps it.
    assert FollowUps(observations, limit=30.0).window() == 30.0
    # Within the window, with the model gone from where the answer came: evicted.
    follow_ups.expect("a", "m", None, T)
    assert follow_ups.arrived("m", None, T + 2, lambda name: name != "a") == "evicted"
    # None comes within the limit: it expires, and nothing answers it any more.
    follow_ups.expect("a", "m", None, T)
    assert follow_ups.expire(T + 99) == 0
    assert follow_ups.expire(T + 100) == 1
    assert follow_ups.arrived("m", None, T + 101, lambda _: True) is None
    found = follow_ups.statistics()
    assert (found.kept, found.late, found.evicted, found.expired, found.pending) == (
        FOLLOW_UP_ENOUGH,
        1,
        1,
        1,
        0,
    )


def test_follow_ups_keep_the_agents_caches_in_a_replay() -> None:
    # The README's agents workload, half as long, its sessions without a
    # session key and not recognised as conversations (``conversations``
    # off): their caches are known by the prefix index alone, which
    # evictions do not weigh, but follow-ups do.
    fleet, trace = agents_trace(agent_keys=0.0)
    assert sum(r.tool for r in trace) > 0.6 * sum(r.agent for r in trace)
    on = replay(fleet, trace, "predictive", seed=0, routing={"conversations": False})
    off = replay(
        fleet, trace, "predictive", seed=0, routing={"follow_ups": False, "conversations": False}
    )
    off.policy = "predictive, follow_ups off"
    print(sessions_table([on, off]))
    kept, lost = Row.of(on), Row.of(off)
    assert kept.unserved == lost.unserved == 0
    assert lost.follow_ups_kept == 0 and kept.follow_ups_kept > 500
    # Measured (seed 0): 1.76M against 2.02M cached tokens thrown away; 7
    # against 9 unloads of Qwen3-8B; 66% against 64% of later turns' prompts
    # read from cache (README: seeds 0-2 of the whole hour).
    assert on.dropped_tokens < 0.93 * off.dropped_tokens
    assert on.agent_unloads < off.agent_unloads
    assert kept.cached_later > lost.cached_later
    # Recognised as conversations (``Affinity.conversation``), follow-ups
    # off, evictions weigh them as keyed sessions. Measured (seed 0): 1.41M
    # cached tokens thrown away, 3 unloads, 70% of later turns' prompts
    # from cache.
    known = replay(fleet, trace, "predictive", seed=0, routing={"follow_ups": False})
    recognised = Row.of(known)
    assert recognised.unserved == 0
    assert known.dropped_tokens < 0.93 * off.dropped_tokens
    assert known.agent_unloads < off.agent_unloads
    assert recognised.cached_later > lost.cached_later
