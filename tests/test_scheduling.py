"""Scheduling: the router's choice on hand-built fleet states, the thrash guard,
tiers, and the gateway's queue (bound, Retry-After, maximum wait)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from cortex.config import CatalogModel, GatewayConfig, ModelsFile, RoutingSection, load_models
from cortex.errors import ConfigError
from cortex.fleet import (
    Activation,
    Cpu,
    Device,
    DeviceSample,
    Discovery,
    Health,
    MemoryBudget,
    ModelStatus,
)
from cortex.gateway import scheduler
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.router import Router
from cortex.gateway.scheduler import Request, ThrashLog
from cortex.gateway.state import FleetState, NeuronState, PendingLoad
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

GIB = 1024
NOW = 1_700_000_000.0


class NoNeurons:
    """A NeuronLink for decisions only: nothing here may act on a neuron."""

    async def discovery(self, neuron: NeuronState) -> Any:
        raise AssertionError("no neuron calls in a decision")

    health = models = load = unload = discovery


def gpu(name: str, vram_mb: int, *loaded: tuple[str, int, float]) -> NeuronState:
    """A neuron with one GPU and ``(model, MiB, last used seconds ago)`` loaded."""
    neuron = NeuronState(name=name, endpoint=f"http://{name}", up=True)
    neuron.discovery = Discovery(
        hostname=name,
        os="Linux",
        kernel="6",
        cpu=Cpu("x", 8),
        ram_total_mb=64000,
        devices=[Device(0, f"u-{name}", "GPU", vram_mb, "9.0")],
    )
    used = sum(mb for _, mb, _ in loaded)
    neuron.health = Health(
        uptime_secs=1,
        devices=[DeviceSample(0, used, vram_mb - used)],
        memory=MemoryBudget(64000, 0),
        activation=Activation(),
    )
    for model_id, mb, ago in loaded:
        neuron.models[model_id] = ModelStatus(
            id=model_id,
            harness="x",
            status="loaded",
            devices=[0],
            memory_mb=mb,
            loaded_at=NOW - 3600,
            last_used=NOW - ago,
        )
    return neuron


def router(*neurons: NeuronState, models: list[CatalogModel], **routing: Any) -> Router:
    state = FleetState.build([], ModelsFile(models=models), clock=lambda: NOW)
    for neuron in neurons:
        neuron.polled.set()
        state.neurons[neuron.name] = neuron
    config = GatewayConfig(routing=RoutingSection(**routing))
    return Router(config=config, state=state, api=NoNeurons(), metrics=GatewayMetrics.create())


def decide(r: Router, model_id: str, arrived: float | None = None) -> Any:
    """``scheduler.decide`` on the router's fleet state now, for a request come at ``arrived``."""
    now = trio.current_time()
    request = Request(model_id, now if arrived is None else arrived)
    return scheduler.decide(r.state, request, now=now, policy=r.policy, queue=r.queue)


def options(r: Router, model_id: str, arrived: float) -> list[str]:
    """The kinds of ``scheduler.options`` open now to a request that came at ``arrived``."""
    found = scheduler.options(
        r.state, model_id, now=trio.current_time(), policy=r.policy, queue=r.queue, arrived=arrived
    )
    return [o.kind for o in found]


M = CatalogModel(id="m", vram_mb=8 * GIB)


# -- the options, each where it should win ---------------------------------------------


async def test_a_free_loaded_replica_wins() -> None:
    r = router(gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), gpu("b", 24 * GIB), models=[M])
    decision = decide(r, "m")
    assert decision.route.kind == "loaded" and decision.route.neuron.name == "a"
    assert decision.route.predicted == 0


async def test_a_load_under_way_wins_over_a_second_cold_load() -> None:
    r = router(gpu("a", 24 * GIB), gpu("b", 24 * GIB), models=[M])
    r.state.pending[("a", "m")] = PendingLoad(
        neuron="a",
        model_id="m",
        reserve_mb={0: 8 * GIB},
        devices=[0],
        evictions=[],
        started=trio.current_time() - 5,
    )
    decision = decide(r, "m")
    assert decision.route.kind == "loading" and decision.route.neuron.name == "a"


async def test_a_cold_load_goes_where_loads_were_measured_fastest() -> None:
    r = router(gpu("a", 24 * GIB), gpu("b", 24 * GIB), models=[M])
    r.observations.record_load("a", "other", 8 * GIB, 20.0)  # ~400 MiB/s
    r.observations.record_load("b", "other", 8 * GIB, 3.0)  # ~4 GiB/s
    decision = decide(r, "m")
    assert decision.route.kind == "cold" and decision.route.neuron.name == "b"
    assert decision.route.predicted == pytest.approx(
        r.observations.load_seconds("b", "m", M.vram_mb)
    )


async def test_loads_never_measured_fall_back_to_the_size_prior() -> None:
    r = router(gpu("a", 24 * GIB), models=[M])
    small = r.observations.load_seconds("a", "s", 1 * GIB)
    big = r.observations.load_seconds("a", "b", 20 * GIB)
    assert 0 < small < big
    # Measured on one neuron: the figure for that model elsewhere too.
    r.observations.record_load("x", "b", 20 * GIB, 7.0)
    assert r.observations.load_seconds("a", "b", 20 * GIB) == 7.0


async def test_room_wins_over_evicting_a_model_in_use() -> None:
    a = gpu("a", 24 * GIB, ("busy-ish", 20 * GIB, 2))
    b = gpu("b", 24 * GIB)
    r = router(a, b, models=[M, CatalogModel(id="busy-ish", vram_mb=20 * GIB)])
    # b loads slower, but evicting on a costs a reload of a model used 2 s ago.
    r.observations.record_load("b", "other", 8 * GIB, 12.0)
    r.observations.record_load("a", "other", 8 * GIB, 4.0)
    decision = decide(r, "m")
    assert decision.route.kind == "cold" and decision.route.neuron.name == "b"


async def test_an_eviction_wins_when_there_is_no_room() -> None:
    r = router(
        gpu("a", 16 * GIB, ("old", 12 * GIB, 3000)),
        models=[M, CatalogModel(id="old", vram_mb=12 * GIB)],
    )
    decision = decide(r, "m")
    assert decision.route.kind == "evict" and decision.route.plan.evictions == ["old"]
    assert decision.route.penalty < 1


async def test_predictive_evicts_what_is_unlikely_to_return_where_lru_does_not() -> None:
    def fleet(policy: str) -> Router:
        a = gpu("a", 16 * GIB, ("popular", 8 * GIB, 100), ("rare", 8 * GIB, 60))
        models = [
            M,
            CatalogModel(id="popular", vram_mb=8 * GIB),
            CatalogModel(id="rare", vram_mb=8 * GIB),
        ]
        r = router(a, gpu("b", 4 * GIB), models=models, policy=policy)
        t = trio.current_time()
        # "popular": a new session every two minutes for an hour; "rare": one.
        for start in range(-3600, -100, 120):
            r.observations.record_arrival("popular", t + start)
        r.observations.record_arrival("rare", t - 60)
        return r

    assert decide(fleet("fixed"), "m").route.plan.evictions == ["popular"]
    assert decide(fleet("predictive"), "m").route.plan.evictions == ["rare"]


async def test_a_busy_replica_holds_requests_at_the_gateway() -> None:
    r = router(gpu("a", 24 * GIB, ("m", 8 * GIB, 1)), models=[M])
    r.state.neurons["a"].in_flight["m"] = 1
    decision = decide(r, "m")
    assert decision.route is None and decision.slot


async def test_scale_out_when_the_wait_stays_high() -> None:
    a = gpu("a", 24 * GIB, ("m", 8 * GIB, 1))
    r = router(a, gpu("b", 24 * GIB), models=[M], scale_out_wait=10, scale_out_after=5)
    a.in_flight["m"] = 1
    r.observations.record_request("a", "m", 30.0, completion_tokens=600, decode_s=30.0)
    t = trio.current_time()
    # Three requests have waited a second: not long enough yet.
    for _ in range(3):
        r.queue.enter("m", t - 1).waiting = "slot"
    assert decide(r, "m").slot
    # Waiting ten seconds, with ~2 minutes still ahead: a second replica on b.
    for ticket in r.queue.lines["m"]:
        ticket.arrived = t - 10
    decision = decide(r, "m")
    assert decision.scale_out and decision.route.kind == "cold"
    assert decision.route.neuron.name == "b"
    assert r.policy.scales_in


async def test_fixed_policy_keeps_the_old_order() -> None:
    a = gpu("a", 24 * GIB, ("m", 8 * GIB, 1))
    r = router(a, gpu("b", 24 * GIB), models=[M], policy="fixed")
    a.in_flight["m"] = 5  # busy, but loaded: the fixed order sends it there
    decision = decide(r, "m")
    assert decision.route.kind == "loaded" and decision.route.neuron.name == "a"


async def test_static_policy_loads_only_on_the_home_neuron() -> None:
    big = CatalogModel(id="big", vram_mb=20 * GIB)
    r = router(gpu("a", 24 * GIB), gpu("b", 24 * GIB), models=[big, M], policy="static")
    homes = r.policy.homes()
    assert homes == {"big": "a", "m": "b"}
    assert decide(r, "m").route.neuron.name == "b"


# -- the thrash guard ---------------------------------------------------------------


def test_thrash_log_counts_reloads_within_the_window_and_guards_them() -> None:
    log = ThrashLog(window=600, residency=60)
    log.evicted("m", 100.0)
    assert log.loaded("m", 400.0) is True and log.count == 1
    assert log.guarded("m", 450.0) and not log.guarded("m", 461.0)
    log.evicted("m", 500.0)
    assert log.loaded("m", 1200.0) is False and log.count == 1
    assert log.loaded("never-evicted", 1300.0) is False


async def test_thrash_guard_makes_requests_wait_before_evicting_a_model_that_thrashed() -> None:
    a = gpu("a", 16 * GIB, ("hot", 12 * GIB, 30))
    models = [M, CatalogModel(id="hot", vram_mb=12 * GIB)]
    r = router(a, models=models, patience=1.0, patience_limit=60.0)
    r.observations.record_load("a", "hot", 12 * GIB, 10.0)
    plain = decide(r, "m")
    # "hot" was evicted and reloaded within ten minutes: it thrashed.
    r.thrash.evicted("hot", trio.current_time() - 120)
    assert r.thrash.loaded("hot", trio.current_time() - 30)
    guarded = decide(r, "m")
    if plain.route is not None:
        assert plain.route.penalty < 10
    # Three times its reload: the request waits that long first.
    assert guarded.route is None and guarded.recheck > 10
    assert not guarded.slot and guarded.hold


async def test_patience_holds_a_request_no_longer_than_its_limit() -> None:
    a = gpu("a", 16 * GIB, ("hot", 12 * GIB, 1))
    models = [M, CatalogModel(id="hot", vram_mb=12 * GIB)]
    r = router(a, models=models, patience=100.0, patience_limit=20.0)
    r.observations.record_load("a", "other", 8 * GIB, 5.0)
    load = r.observations.load_seconds("a", "m", M.vram_mb)
    t = trio.current_time()
    # Its penalty times 100 is far off; its first token may come 20 s after
    # it came, the load takes ~5 s: it is held up to ~15 s, and claims no room.
    held = decide(r, "m", t)
    assert held.route is None and held.hold and held.wants == frozenset()
    assert held.recheck == pytest.approx(20.0 - load, abs=0.6)
    # Past that, it evicts, cheap or not.
    decision = decide(r, "m", t - held.recheck - 0.01)
    assert decision.route.kind == "evict" and decision.route.penalty * 100 > 20


async def test_a_request_held_by_patience_does_not_block_others() -> None:
    a = gpu("a", 18 * GIB, ("hot", 12 * GIB, 1))
    small = CatalogModel(id="small", vram_mb=4 * GIB)
    models = [M, small, CatalogModel(id="hot", vram_mb=12 * GIB)]
    r = router(a, models=models, patience=100.0, patience_limit=60.0)
    t = trio.current_time()
    held = decide(r, "m", t - 1)
    assert held.hold and held.wants == frozenset()
    r.queue.enter("m", t - 1).wants = held.wants
    # A later request that fits in the free room is not kept out of it.
    assert options(r, "small", arrived=t) == ["cold"]


def test_the_patience_limit_follows_the_tail_of_requests_not_held() -> None:
    r = router(gpu("a", 24 * GIB), models=[M], patience=1.0)
    assert r.policy.patience_limit() == 10.0  # too few requests measured yet
    for n in range(200):
        r.observations.record_first_token(0.5 if n % 50 else 30.0)
    # The slowest 1% (here 2% take 30 s): held to 30 s at most.
    assert r.policy.patience_limit() == 30.0
    assert router(gpu("a", 24 * GIB), models=[M], patience_limit=7.0).policy.patience_limit() == 7


def test_patience_tail_sets_the_percentile_of_the_limit() -> None:
    assert RoutingSection().patience_tail == 99.0
    r = router(gpu("a", 24 * GIB), models=[M], patience=1.0, patience_tail=97.0)
    for n in range(200):
        r.observations.record_first_token(0.5 if n % 50 else 30.0)
    # 2% take 30 s, the 97th percentile is 0.5 s: the floor.
    assert r.policy.patience_limit() == 10.0
    for n in range(100):
        r.observations.record_first_token(20.0 if n % 10 == 0 else 0.5)
    # Of 300, 4 take 30 s and 10 take 20 s: the slowest 3% (9) start at 20 s.
    assert r.policy.patience_limit() == 20.0
    assert router(gpu("a", 24 * GIB), models=[M], patience_tail=50.0).policy.patience_limit() == 10


def test_the_first_token_tail_follows_every_new_sample() -> None:
    observations = scheduler.Observations()
    for n in range(scheduler.FIRST_TOKEN_WINDOW):
        observations.record_first_token(float(n % 100))
    assert observations.first_token_percentile(99.0) == 98.0
    assert observations.first_token_percentile(50.0) == 49.0
    # A new sample counts at once (and the oldest, a 0, leaves the window).
    observations.record_first_token(500.0)
    assert observations.first_token_percentile(50.0) == 50.0
    for _ in range(19):
        observations.record_first_token(500.0)
    assert observations.first_token_percentile(99.0) == 500.0
    assert observations.first_token_percentile(97.0) == 98.0
    assert observations.first_token_percentile(50.0) == 51.0


def test_patience_tail_is_a_percentile() -> None:
    with pytest.raises(ValueError):
        RoutingSection(patience_tail=0)
    with pytest.raises(ValueError):
        RoutingSection(patience_tail=100.5)


async def test_a_thrash_window_of_zero_counts_idle_models_as_gone() -> None:
    a = gpu("a", 16 * GIB, ("old", 12 * GIB, 5))
    r = router(a, models=[M, CatalogModel(id="old", vram_mb=12 * GIB)], thrash_window=0)
    t = trio.current_time()
    r.observations.record_arrival("old", t - 10)
    r.observations.record_arrival("old", t - 5)  # a gap within its session measured
    decision = decide(r, "m")
    assert decision.route.kind == "evict" and decision.route.penalty == 0
    with pytest.raises(ValueError):
        RoutingSection(thrash_window=-1)


async def test_patience_zero_evicts_at_once() -> None:
    a = gpu("a", 16 * GIB, ("hot", 12 * GIB, 1))
    r = router(a, models=[M, CatalogModel(id="hot", vram_mb=12 * GIB)], patience=0)
    decision = decide(r, "m")
    assert decision.route.kind == "evict" and decision.route.penalty > 0


async def test_thrash_is_counted_through_the_gateway() -> None:
    a = FakeNeuron("a", memory_mb=500, sizes={"m/a": 400, "m/b": 400})
    models = catalogue(CatalogModel(id="m/a", vram_mb=400), CatalogModel(id="m/b", vram_mb=400))
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            for model in ("m/a", "m/b", "m/a"):
                assert (await fleet.chat(model)).status_code == 200
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert 'cortex_thrash_total{model="m/a"} 1.0' in metrics
            assert 'cortex_route_decisions_total{kind="evict"} 2.0' in metrics
            assert 'cortex_route_decisions_total{kind="cold"} 1.0' in metrics
            assert "cortex_predicted_time_to_first_token_seconds_count" in metrics


# -- tiers ----------------------------------------------------------------------------


def test_tier_aliases_in_models_toml(tmp_path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "a"\n[[models]]\nid = "b"\n'
        '[aliases]\n"tier/small" = ["a", "b"]\nplain = "a"\n'
    )
    models = load_models(path)
    assert models.aliases == {"tier/small": ["a", "b"], "plain": "a"}
    path.write_text('[[models]]\nid = "a"\n[aliases]\n"tier/x" = ["a", "zzz"]\n')
    with pytest.raises(ConfigError, match=r"aliases\.tier/x: unknown model .zzz."):
        load_models(path)
    path.write_text('[[models]]\nid = "a"\n[aliases]\n"tier/x" = []\n')
    with pytest.raises(ConfigError, match="non-empty list"):
        load_models(path)


async def test_a_tier_resolves_to_a_loaded_member_first() -> None:
    small, tiny = CatalogModel(id="small", vram_mb=2 * GIB), CatalogModel(id="tiny", vram_mb=GIB)
    tiers = {"tier/small": ["small", "tiny"]}
    a = gpu("a", 24 * GIB, ("tiny", GIB, 10))
    for policy in ("predictive", "fixed"):
        r = router(a, models=[small, tiny], policy=policy)
        r.state.catalogue = attrs.evolve(r.state.catalogue, tiers=tiers)
        assert r.resolve("tier/small") == "tiny"
        assert r.label("tier/small") == "tier/small"
    # Nothing loaded: the first member (fixed), the quickest to load (predictive).
    r = router(gpu("b", 24 * GIB), models=[small, tiny], policy="fixed")
    r.state.catalogue = attrs.evolve(r.state.catalogue, tiers=tiers)
    assert r.resolve("tier/small") == "small"
    r = router(gpu("b", 24 * GIB), models=[small, tiny])
    r.state.catalogue = attrs.evolve(r.state.catalogue, tiers=tiers)
    assert r.resolve("tier/small") == "tiny"


async def test_a_tier_through_the_gateway() -> None:
    a = FakeNeuron("a", preload=["org/b"])
    models = catalogue(
        CatalogModel(id="org/a", vram_mb=100),
        CatalogModel(id="org/b", vram_mb=100),
        aliases={"tier/small": ["org/a", "org/b"]},  # type: ignore[dict-item]
    )
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            response = await fleet.chat("tier/small")
            assert response.status_code == 200, response.text
            assert a.requests[-1][1]["model"] == "org/b"
            assert a.load_calls == []
            entries = {m["id"]: m for m in (await fleet.client.get("/v1/models")).json()["data"]}
            assert entries["tier/small"]["alias_of"] == "org/b"
            assert entries["tier/small"]["tier"] == ["org/a", "org/b"]
            assert entries["tier/small"]["loaded"] is True


# -- the queue ------------------------------------------------------------------------


async def test_queue_bound_gives_503_and_529_with_retry_after() -> None:
    hold = trio.Event()
    a = FakeNeuron("a", preload=["org/m"], hold=hold)
    models = catalogue(CatalogModel(id="org/m", vram_mb=100))
    with trio.fail_after(10):
        async with running_fleet([a], models, routing={"queue_limit": 1}) as fleet:
            results: list[int] = []

            async def ask() -> None:
                results.append((await fleet.chat("org/m")).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)  # takes the one slot
                await a.request_arrived.wait()
                nursery.start_soon(ask)  # waits at the gateway: the queue is full
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert fleet.state.neurons["a"].in_flight == {"org/m": 1}
                response = await fleet.chat("org/m")
                assert response.status_code == 503
                assert int(response.headers["retry-after"]) >= 1
                message = response.json()["error"]["message"]
                assert message == "the queue for 'org/m' is full: 1 waiting already"
                anthropic = await fleet.client.post(
                    "/v1/messages",
                    json={
                        "model": "org/m",
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                assert anthropic.status_code == 529
                assert anthropic.json()["error"]["type"] == "overloaded_error"
                assert int(anthropic.headers["retry-after"]) >= 1
                hold.set()
            assert results == [200, 200]
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert 'cortex_route_decisions_total{kind="queued"}' in metrics
            assert 'cortex_queue_wait_seconds_count{model="org/m"}' in metrics


async def test_no_request_waits_past_max_wait() -> None:
    hold = trio.Event()
    a = FakeNeuron("a", preload=["org/m"], hold=hold)
    models = catalogue(CatalogModel(id="org/m", vram_mb=100))
    with trio.fail_after(10):
        async with running_fleet([a], models, routing={"max_wait": 0.3}) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.chat, "org/m")
                await a.request_arrived.wait()
                start = trio.current_time()
                response = await fleet.chat("org/m")
                waited = trio.current_time() - start
                hold.set()
            assert response.status_code == 503
            assert "within 0.3 s" in response.json()["error"]["message"]
            assert 0.3 <= waited < 2


async def test_the_longest_waiting_model_gets_the_room_first() -> None:
    old, new = CatalogModel(id="old", vram_mb=8 * GIB), CatalogModel(id="new", vram_mb=8 * GIB)
    r = router(
        gpu("a", 8 * GIB, ("busy", 8 * GIB, 1)),
        models=[old, new, CatalogModel(id="busy", vram_mb=8 * GIB)],
    )
    r.state.neurons["a"].in_flight["busy"] = 1
    t = trio.current_time()
    decision = decide(r, "old", t - 5)
    assert decision.route is None and decision.wants == {"a"}
    r.queue.enter("old", t - 5).wants = decision.wants
    # The busy model is done: "new" arrives now, but "old" has waited longer.
    r.state.neurons["a"].in_flight.clear()
    assert options(r, "new", arrived=t) == []
    assert options(r, "old", arrived=t - 5) == ["evict"]
