"""``scheduler.decide`` called directly: plain functions over a fleet state built here.

No trio run and no router: these tests are synchronous, so a decision that
read trio's clock or awaited anything would fail them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest

from cortex.config import CatalogModel, GatewayConfig, ModelsFile, RoutingSection
from cortex.errors import ModelNotFound, Unavailable, UpstreamError
from cortex.gateway import scheduler
from cortex.gateway.evictor import Plan
from cortex.gateway.scheduler import (
    UNLOAD_S,
    Decision,
    FollowUps,
    Observations,
    Option,
    Policy,
    Predictor,
    Request,
    ThrashLog,
    WaitQueue,
    make_policy,
)
from cortex.gateway.state import FleetState, NeuronState, PendingLoad
from tests.test_scheduling import GIB, NOW, gpu

#: trio time of every decision here.
T = 1000.0

M = CatalogModel(id="m", vram_mb=8 * GIB)


def policy(
    *neurons: NeuronState,
    models: list[CatalogModel],
    clock: Callable[[], float] = lambda: NOW,
    **routing: Any,
) -> Policy:
    """The policy a router would build over these neurons, with no router around it.

    Wired as the router wires it: the predictor's follow-ups are
    ``p.predictor.follow_ups``.
    """
    state = FleetState.build([], ModelsFile(models=models), clock=clock)
    for neuron in neurons:
        state.neurons[neuron.name] = neuron
    config = GatewayConfig(routing=RoutingSection(**routing))
    thrash = ThrashLog(window=config.routing.thrash_window)
    observations = Observations()
    follow_ups = FollowUps(
        observations, limit=config.routing.follow_up_limit, enabled=config.routing.follow_ups
    )
    predictor = Predictor(
        state,
        observations,
        horizon=config.routing.thrash_window,
        thrash=thrash,
        follow_ups=follow_ups,
    )
    queue = WaitQueue(limit=config.routing.queue_limit)
    return make_policy(config, state, predictor, queue, thrash)


def decide(p: Policy, model_id: str, **facts: Any) -> Decision:
    request = Request(model_id, facts.pop("arrived", T), **facts)
    return scheduler.decide(p.state, request, now=T, policy=p, queue=p.queue)


def test_a_warm_replica_is_taken() -> None:
    a, b = gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), gpu("b", 24 * GIB)
    p = policy(a, b, models=[M])
    assert decide(p, "m") == Decision(Option("loaded", a, 0.0))


def test_a_busy_replica_is_waited_for_before_a_replica_is_added() -> None:
    a, b = gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), gpu("b", 24 * GIB)
    a.in_flight["m"] = 1
    p = policy(a, b, models=[M], scale_out_wait=1.0, scale_out_after=5.0)
    p.predictor.observations.record_load("b", "other", 8 * GIB, 1.5)
    service = p.predictor.service(a, "m")
    assert service > p.predictor.load(b, "m") > 1.0
    # Its one slot is taken; the wait ahead is over scale_out_wait, but no
    # request has waited scale_out_after yet: wait, and look again then.
    assert decide(p, "m") == Decision(None, slot=True, expected=service, recheck=5.0)
    # After that, a replica on b is sooner than the slot.
    added = decide(p, "m", arrived=T - 6)
    assert added == Decision(
        Option("cold", b, p.predictor.load(b, "m"), plan=Plan([0], [])), scale_out=True
    )


def test_a_cold_load_goes_to_the_neuron_with_room() -> None:
    pinned = CatalogModel(id="p", vram_mb=20 * GIB, pinned_on=["a"])
    a, b = gpu("a", 24 * GIB, ("p", 20 * GIB, 3000)), gpu("b", 24 * GIB)
    p = policy(a, b, models=[M, pinned])
    assert decide(p, "m") == Decision(
        Option("cold", b, p.predictor.load(b, "m"), plan=Plan([0], []))
    )


def test_a_load_under_way_is_joined() -> None:
    a, b = gpu("a", 24 * GIB), gpu("b", 24 * GIB)
    p = policy(a, b, models=[M])
    load = PendingLoad("a", "m", {0: 8 * GIB}, [0], [], started=T - 1)
    p.state.pending[("a", "m")] = load
    predicted = p.predictor.loading(a, "m", load, T)
    assert decide(p, "m") == Decision(Option("loading", a, predicted, load=load))


def test_an_eviction_spares_pinned_models() -> None:
    pinned = CatalogModel(id="p", vram_mb=8 * GIB, pinned_on=["a"])
    old = CatalogModel(id="old", vram_mb=8 * GIB)
    # "p" is the least recently used, but pinned on a: "old" goes.
    a = gpu("a", 16 * GIB, ("p", 8 * GIB, 9000), ("old", 8 * GIB, 3000))
    p = policy(a, models=[M, pinned, old])
    decision = decide(p, "m")
    penalty = p.predictor.penalty(a, "old", T)
    assert decision == Decision(
        Option(
            "evict",
            a,
            p.predictor.load(a, "m") + UNLOAD_S + penalty,
            plan=Plan([0], ["old"]),
            penalty=penalty,
        )
    )


def test_only_pinned_models_in_the_way_is_a_503_at_once() -> None:
    pinned = CatalogModel(id="p", vram_mb=12 * GIB, pinned_on=["a"])
    a = gpu("a", 16 * GIB, ("p", 12 * GIB, 9000))
    p = policy(a, models=[M, pinned])
    with pytest.raises(Unavailable) as raised:
        decide(p, "m")
    assert raised.value.message == (
        "no room for 'm' on a now: it needs 8192 MiB, and at most 4096 MiB on device 0 could be "
        "free there after evicting every model that may be evicted (pinned there: 'p')"
    )


def test_a_busy_model_in_the_way_makes_the_request_wait_for_room() -> None:
    busy = CatalogModel(id="busy", vram_mb=12 * GIB)
    a = gpu("a", 16 * GIB, ("busy", 12 * GIB, 1))
    a.in_flight["busy"] = 1
    p = policy(a, models=[M, busy])
    assert decide(p, "m") == Decision(None, wants=frozenset({"a"}))
    # A policy that does not queue answers 503 instead.
    fixed = policy(a, models=[M, busy], policy="fixed")
    with pytest.raises(Unavailable):
        decide(fixed, "m")


def test_no_room_says_the_model_is_stalled_and_where_it_is_out_of_reach() -> None:
    a, b, c = (gpu(name, 16 * GIB, ("m", 8 * GIB, 5)) for name in "abc")
    a.stalled.add("m")
    b.draining = True
    c.up = False
    p = policy(a, b, c, models=[M], policy="fixed")
    with pytest.raises(Unavailable) as raised:
        decide(p, "m")
    assert raised.value.message == (
        "no room for 'm' on a now: it is stalled there; "
        "b, where it is loaded, is draining; c, where it is loaded, is down"
    )


def test_a_model_with_requests_waiting_is_not_evicted() -> None:
    queued = CatalogModel(id="queued", vram_mb=12 * GIB)
    a = gpu("a", 16 * GIB, ("queued", 12 * GIB, 3000))
    p = policy(a, models=[M, queued])
    assert decide(p, "m").route.kind == "evict"
    p.queue.enter("queued", T - 1)
    assert decide(p, "m") == Decision(None, wants=frozenset({"a"}))


def test_patience_holds_an_expensive_eviction() -> None:
    hot = CatalogModel(id="hot", vram_mb=12 * GIB)
    a = gpu("a", 16 * GIB, ("hot", 12 * GIB, 1))
    p = policy(a, models=[M, hot], patience=100.0, patience_limit=20.0)
    quickest = p.predictor.load(a, "m") + UNLOAD_S
    held = decide(p, "m")
    assert held == Decision(None, recheck=pytest.approx(20.0 - quickest), hold=True)
    # Held that long, it evicts.
    assert decide(p, "m", arrived=T - held.recheck - 0.01).route.kind == "evict"


def test_an_excluded_neuron_is_not_routed_to() -> None:
    a, b = gpu("a", 24 * GIB, ("m", 8 * GIB, 5)), gpu("b", 24 * GIB)
    p = policy(a, b, models=[M])
    decision = decide(p, "m", exclude=frozenset({"a"}))
    assert decision == Decision(Option("cold", b, p.predictor.load(b, "m"), plan=Plan([0], [])))


def test_refusals_say_whether_waiting_can_help() -> None:
    a = gpu("a", 24 * GIB)
    huge = CatalogModel(id="huge", vram_mb=40 * GIB)
    p = policy(a, models=[M, huge])
    with pytest.raises(ModelNotFound, match="'nothing' does not exist"):
        decide(p, "nothing")
    with pytest.raises(ModelNotFound, match="fits on no neuron"):
        decide(p, "huge")
    # A model outside the catalogue, loaded on a neuron that is down: 503.
    down = gpu("down", 24 * GIB, ("extra", 4 * GIB, 5))
    down.up = False
    p = policy(a, down, models=[M])
    with pytest.raises(Unavailable, match="no neuron that has 'extra'"):
        decide(p, "extra")
    # The last load's error, when the only neuron is excluded after it.
    failed = UpstreamError("loading 'm' on a failed: disk full")
    with pytest.raises(UpstreamError) as raised:
        decide(p, "m", exclude=frozenset({"a"}), last_error=failed)
    assert raised.value is failed


def test_deciding_changes_nothing() -> None:
    busy = CatalogModel(id="busy", vram_mb=12 * GIB)
    a = gpu("a", 16 * GIB, ("busy", 12 * GIB, 1), ("old", 4 * GIB, 3000))
    a.in_flight["busy"] = 1
    p = policy(a, models=[M, busy, CatalogModel(id="old", vram_mb=4 * GIB)])
    p.queue.enter("busy", T - 2)

    def seen() -> Any:
        neuron = attrs.asdict(a, filter=lambda f, _: f.name not in ("polled", "poke"))
        lines = {
            m: [(t.arrived, t.wants, t.waiting) for t in ts] for m, ts in p.queue.lines.items()
        }
        return neuron, dict(p.state.pending), lines

    before = seen()
    for _ in range(3):
        assert decide(p, "m") == Decision(None, wants=frozenset({"a"}))
    assert seen() == before
