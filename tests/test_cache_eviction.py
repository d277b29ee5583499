"""Evictions weigh the prompt caches of agent sessions; slot waits count the prompt left.

Plain functions over a fleet state built here (``scheduler.decide``, the
affinity's ``eviction_cost``), then the router measuring the prefill rate,
then a seeded replay in ``cortex.sim``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import attrs
import pytest
import trio

from cortex.config import CatalogModel
from cortex.gateway import scheduler
from cortex.gateway.affinity import (
    BYTES_PER_TOKEN,
    PREFILL_OVER_DECODE,
    Affinity,
    Prompt,
)
from cortex.gateway.evictor import Plan
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.scheduler import (
    PREFILL_ENOUGH,
    PREFILL_SAMPLE_TOKENS,
    UNLOAD_S,
    Decision,
    Observations,
    Option,
    Policy,
    Request,
)
from cortex.gateway.state import NeuronState
from cortex.harness import PromptCacheStatistics
from cortex.sim.fleet import FleetFile
from cortex.sim.replay import TraceRequest, replay
from cortex.sim.report import Row, sessions_table
from cortex.sim.trace import TraceSettings, generate
from tests.test_decide import policy
from tests.test_scheduling import GIB, NOW, gpu, router

#: trio time of every decision here.
T = 1000.0

AGENT = CatalogModel(id="agent", vram_mb=8 * GIB)
OTHER = CatalogModel(id="other", vram_mb=8 * GIB)
NEW = CatalogModel(id="new", vram_mb=12 * GIB)


class Clock:
    """The fleet's wall clock, moved by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def build(
    *neurons: NeuronState, models: list[CatalogModel], **routing: Any
) -> tuple[Policy, Affinity, Clock]:
    """The policy and affinity a router would build over these neurons, wired as it wires them."""
    clock = Clock()
    built = policy(*neurons, models=models, clock=clock, **routing)
    affinity = Affinity(
        built.predictor,
        GatewayMetrics.create(),
        enabled=built.config.routing.affinity,
        weigh_caches=built.config.routing.weigh_caches,
        conversations=built.config.routing.conversations,
    )
    built.predictor.caches = affinity.eviction_cost
    return built, affinity, clock


def caching(neuron: NeuronState, *models: str) -> NeuronState:
    """``neuron`` with ``models`` reporting a prompt cache, as the llama.cpp engine does."""
    for model_id in models:
        status = neuron.models[model_id]
        neuron.models[model_id] = attrs.evolve(status, prompt_cache=PromptCacheStatistics())
    return neuron


def prompt(session: str, tokens: int) -> Prompt:
    return Prompt(session=session, blocks=(), size=int(tokens * BYTES_PER_TOKEN))


def decode_prior(size_mb: int) -> float:
    return min(500.0, max(2.0, scheduler.PRIOR_DECODE / size_mb))


def test_the_eviction_cost_is_the_sessions_prompts_weighed_by_their_return() -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5), ("other", 8 * GIB, 5)), "agent")
    b = caching(gpu("b", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    p, affinity, clock = build(a, b, models=[AGENT, OTHER])
    rate = decode_prior(8 * GIB) * PREFILL_OVER_DECODE
    assert affinity.eviction_cost(a, "agent") == 0.0  # no session seen yet
    affinity.routed("agent", prompt("s1", 10_000), "a")
    affinity.routed("agent", prompt("s2", 4_000), "a")
    affinity.routed("agent", prompt("s3", 6_000), "b")
    clock.now += 30
    # Idle 30 s against the floor's 30 s scale (no turn gap measured yet).
    assert affinity.eviction_cost(a, "agent") == pytest.approx(14_000 * math.exp(-1) / rate)
    assert affinity.eviction_cost(b, "agent") == pytest.approx(6_000 * math.exp(-1) / rate)
    # s1's next turn, 30 s on, goes to b: its cache is b's now, and a turn
    # gap of 30 s makes the scale 90 s.
    affinity.routed("agent", prompt("s1", 11_000), "b")
    clock.now += 45
    assert affinity.eviction_cost(a, "agent") == pytest.approx(4_000 * math.exp(-75 / 90) / rate)
    assert affinity.eviction_cost(b, "agent") == pytest.approx(
        (6_000 * math.exp(-75 / 90) + 11_000 * math.exp(-45 / 90)) / rate
    )
    # The penalty adds it in full, another replica or not; the reload part
    # is a tenth for a victim loaded elsewhere.
    reload = p.predictor.return_chance("agent", 5 + 75, T) * p.predictor.load(a, "agent")
    assert p.predictor.penalty(a, "agent", T) == pytest.approx(
        0.1 * reload + affinity.eviction_cost(a, "agent")
    )
    # A model that keeps no prompt cache loses none.
    affinity.routed("other", prompt("s9", 8_000), "a")
    assert affinity.eviction_cost(a, "other") == 0.0
    # Sessions idle past the horizon count for nothing; an unload forgets them.
    clock.now += p.config.routing.thrash_window
    affinity.routed("agent", prompt("s4", 1_000), "a")
    assert affinity.eviction_cost(a, "agent") == pytest.approx(1_000 / rate)
    affinity.forget("a", "agent")
    assert affinity.eviction_cost(a, "agent") == 0.0
    assert affinity.statistics().sessions == 3  # s1, s3 on b; s9 for other


@pytest.mark.parametrize("setting", [{"weigh_caches": False}, {"affinity": False}])
def test_with_the_setting_off_caches_cost_nothing(setting: dict[str, bool]) -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    p, affinity, _ = build(a, models=[AGENT], **setting)
    affinity.routed("agent", prompt("s1", 10_000), "a")
    assert affinity.eviction_cost(a, "agent") == 0.0
    assert p.predictor.cache_cost(a, "agent") == 0.0


def test_a_victim_holding_sessions_caches_goes_after_one_more_likely_to_return() -> None:
    # "agent" was used longer ago than "other": least likely to be asked for
    # again, it is the victim; with a session's prompt cached, "other" is.
    def fleet() -> tuple[Policy, Affinity, NeuronState]:
        a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 100), ("other", 8 * GIB, 50)), "agent")
        p, affinity, _ = build(a, models=[AGENT, OTHER, NEW])
        return p, affinity, a

    p, _, a = fleet()
    decision = scheduler.decide(p.state, Request("new", T), now=T, policy=p, queue=p.queue)
    assert decision.route is not None and decision.route.plan == Plan([0], ["agent"])
    assert decision.route.caches == 0.0

    p, affinity, a = fleet()
    affinity.routed("agent", prompt("s1", 4_000), "a")
    cost = affinity.eviction_cost(a, "agent")
    assert cost > 0.2 * p.predictor.load(a, "agent")  # enough to move it two tenths
    decision = scheduler.decide(
        p.state, Request("new", T), now=T, policy=p, queue=p.queue, affinity=affinity
    )
    penalty = p.predictor.penalty(a, "other", T)
    assert decision == Decision(
        Option(
            "evict",
            a,
            p.predictor.load(a, "new") + UNLOAD_S + penalty,
            plan=Plan([0], ["other"]),
            penalty=penalty,
        )
    )


def test_an_eviction_that_throws_caches_away_waits_up_to_their_cost() -> None:
    # Only "agent" can make room: rent before buying, whatever patience.
    a = caching(gpu("a", 16 * GIB, ("agent", 8 * GIB, 20)), "agent")
    p, affinity, _ = build(a, models=[AGENT, NEW], patience_limit=40.0)
    affinity.routed("agent", prompt("s1", 1_000), "a")
    cost = affinity.eviction_cost(a, "agent")
    assert 0 < cost < 40.0 - (p.predictor.load(a, "new") + UNLOAD_S)

    def decide(waited: float) -> Decision:
        request = Request("new", T - waited)
        return scheduler.decide(p.state, request, now=T, policy=p, queue=p.queue, affinity=affinity)

    held = decide(0.0)
    assert held.route is None and held.hold and held.recheck == pytest.approx(cost)
    assert decide(cost / 2).recheck == pytest.approx(cost / 2)
    taken = decide(cost)
    assert taken.route is not None and taken.route.plan == Plan([0], ["agent"])
    assert taken.route.caches == pytest.approx(cost)
    assert taken.route.hold(0.0) == pytest.approx(cost)
    assert taken.route.hold(1.0) == pytest.approx(taken.route.penalty)


def test_a_long_hold_ends_at_the_patience_limit() -> None:
    a = caching(gpu("a", 16 * GIB, ("agent", 8 * GIB, 20)), "agent")
    p, affinity, _ = build(a, models=[AGENT, NEW], patience_limit=30.0)
    affinity.routed("agent", prompt("s1", 200_000), "a")
    assert affinity.eviction_cost(a, "agent") > 100
    limit = 30.0 - (p.predictor.load(a, "new") + UNLOAD_S)

    def decide(waited: float) -> Decision:
        return scheduler.decide(
            p.state, Request("new", T - waited), now=T, policy=p, queue=p.queue, affinity=affinity
        )

    assert decide(0.0).recheck == pytest.approx(limit)
    assert decide(limit).route is not None


def test_a_saturated_replicas_slot_wait_counts_the_prompt_left_to_process() -> None:
    a = caching(gpu("a", 24 * GIB, ("agent", 8 * GIB, 5)), "agent")
    b = gpu("b", 24 * GIB)
    a.in_flight["agent"] = 1
    p, affinity, _ = build(a, b, models=[AGENT], scale_out_wait=1.0, scale_out_after=5.0)
    affinity.routed("agent", prompt("s1", 3_000), "a")
    rate = decode_prior(8 * GIB) * PREFILL_OVER_DECODE
    service = p.predictor.service(a, "agent")
    # The next turn: 3,000 tokens cached on a, 500 new; a cold replica on b
    # would process all 3,500.
    turn = prompt("s1", 3_500)
    decision = scheduler.decide(
        p.state, Request("agent", T, prompt=turn), now=T, policy=p, queue=p.queue, affinity=affinity
    )
    assert decision == Decision(None, slot=True, expected=service + 500 / rate, recheck=5.0)
    # Without affinity the slot wait is the queue's alone.
    plain = scheduler.decide(p.state, Request("agent", T), now=T, policy=p, queue=p.queue)
    assert plain == Decision(None, slot=True, expected=service, recheck=5.0)


def test_the_prefill_rate_is_measured_and_preferred_to_the_prior() -> None:
    observations = Observations()
    observations.record_prefill("a", "m", PREFILL_SAMPLE_TOKENS - 1, 0.01)  # overheads only
    for _ in range(PREFILL_ENOUGH - 1):
        observations.record_prefill("a", "m", 3_000, 1.0)
    assert observations.prefill_tps("a", "m") is None  # not enough yet
    observations.record_prefill("a", "m", 1_000, 1.0)
    # Tokens and seconds averaged apart (EWMA, ALPHA 0.3): 2,400 / 1.0.
    assert observations.prefill_tps("a", "m") == pytest.approx(2_400.0)
    a = caching(gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), "m")
    b = caching(gpu("b", 24 * GIB, ("m", 8 * GIB, 5)), "m")
    c = caching(gpu("c", 24 * GIB, ("x", 8 * GIB, 5)), "x")
    p, affinity, _ = build(a, b, c, models=[CatalogModel(id="m", vram_mb=8 * GIB)])
    p.predictor.observations.prefill_tokens = observations.prefill_tokens
    p.predictor.observations.prefill_s = observations.prefill_s
    assert affinity.prefill_seconds(a, "m", 4_800) == pytest.approx(2.0)
    # Not measured on b: what a measured.
    assert affinity.prefill_seconds(b, "m", 4_800) == pytest.approx(2.0)
    # Measured nowhere: the prior over the decode rate.
    rate = decode_prior(8 * GIB) * PREFILL_OVER_DECODE
    assert affinity.prefill_seconds(c, "x", 4_800) == pytest.approx(4_800 / rate)


async def test_the_router_measures_the_prefill_rate_from_free_slots_only(
    autojump_clock: trio.abc.Clock,
) -> None:
    a = caching(gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), "m")
    a.models["m"] = attrs.evolve(a.models["m"], parallel=2)
    r = router(a, models=[CatalogModel(id="m", vram_mb=8 * GIB)])
    observations = r.observations
    # Three first turns of 2,000 tokens each, none cached: a free slot each.
    for n in range(PREFILL_ENOUGH):
        neuron = await r.acquire("m", exclude=set(), prompt=prompt(f"s{n}", 2_000))
        r.release(neuron, "m", first_token_s=0.5)
    assert observations.prefill_tps("a", "m") == pytest.approx(4_000.0)
    # A next turn: 2,000 cached, 600 new; 0.2 s to its first token.
    neuron = await r.acquire("m", exclude=set(), prompt=prompt("s0", 2_600))
    r.release(neuron, "m", first_token_s=0.2)
    tokens = observations.prefill_tokens[("a", "m")]
    seconds = observations.prefill_s[("a", "m")]
    assert (tokens.count, tokens.value) == (4, pytest.approx(2_000 + 0.3 * (600 - 2_000)))
    assert seconds.value == pytest.approx(0.5 + 0.3 * (0.2 - 0.5))
    # A request that waited 4 s at the gateway for a slot: the wait is not
    # prefill; from its route on, 0.4 s for 3,000 tokens.
    first = await r.acquire("m", exclude=set(), prompt=prompt("s1", 2_000))
    second = await r.acquire("m", exclude=set(), prompt=prompt("s2", 2_000))
    waiting = None

    async def third() -> None:
        nonlocal waiting
        waiting = await r.acquire("m", exclude=set(), prompt=prompt("s3", 3_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(4.0)
        assert waiting is None
        r.release(first, "m", first_token_s=0.1)  # all cached: no sample
        r.release(second, "m", first_token_s=0.1)
    assert waiting is not None and tokens.count == 4
    r.release(waiting, "m", first_token_s=4.4)
    assert tokens.count == 5 and tokens.value == pytest.approx(1_580 + 0.3 * (3_000 - 1_580))
    assert seconds.value == pytest.approx(0.41 + 0.3 * (0.4 - 0.41))


AGENTS_FLEET = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "sim" / "agents.toml"


def agents_trace(**changes: Any) -> tuple[FleetFile, list[TraceRequest]]:
    """The README's agents workload, half as long: 40 agent sessions on
    Qwen3-8B among ordinary traffic at twice the fleet's memory; ``changes``
    to its ``TraceSettings``."""
    fleet = FleetFile.read(AGENTS_FLEET)
    settings = TraceSettings(
        duration=1800,
        seed=1,
        agents=40,
        turns=20,
        agent_spread=300,
        agent_model="Qwen/Qwen3-8B",
        **changes,
    )
    return fleet, generate(fleet, settings)


def test_ordinary_traffic_throws_fewer_agent_caches_away_at_about_the_same_cold_loads() -> None:
    # Answers in words only: the trace these figures were measured on.
    fleet, trace = agents_trace(tool_share=0.0)
    weighed = replay(fleet, trace, "predictive", seed=0)
    blind = replay(fleet, trace, "predictive", seed=0, routing={"weigh_caches": False})
    blind.policy = "predictive, weigh_caches off"
    print(sessions_table([weighed, blind]))
    on, off = Row.of(weighed), Row.of(blind)
    assert on.unserved == off.unserved == 0
    # Measured: 1.54M against 1.99M tokens dropped; 74% against 60% of later
    # turns' prompts read from cache; 372 against 455 later turns missing
    # part of their conversation; 177 against 172 cold loads (seeds 0-2:
    # 171-177 against 164-178).
    assert weighed.dropped_tokens < 0.85 * blind.dropped_tokens
    assert on.cached_later > off.cached_later + 0.08
    assert on.missed < 0.9 * off.missed
    assert weighed.cold_loads <= 1.05 * blind.cold_loads
