"""The loader carries out decisions; the fleet state's named changes; when scale-in is due."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from cortex.config import CatalogModel, GatewayConfig, ModelsFile, RoutingSection
from cortex.errors import (
    CortexError,
    InsufficientMemory,
    InvalidCatalogueEntry,
    InvalidModelFile,
    InvalidModelOptions,
    RequestError,
    UpstreamError,
)
from cortex.fleet import ModelStatus
from cortex.gateway import scheduler
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.router import Router
from cortex.gateway.scheduler import Request, ScaleIn, WaitQueue, scale_in
from cortex.gateway.state import Catalogue, FleetState, NeuronState, PendingLoad
from tests.test_scheduling import GIB, NOW, gpu

M = CatalogModel(id="m", vram_mb=8 * GIB, harness="llamacpp")
OLD = CatalogModel(id="old", vram_mb=12 * GIB)


@attrs.define
class Link:
    """A NeuronLink that records what is done to the neurons, and answers from their state."""

    calls: list[tuple[Any, ...]] = attrs.field(factory=list)
    #: Raised by ``load`` instead of loading.
    refuse: Exception | None = None

    async def health(self, neuron: NeuronState) -> Any:
        return neuron.health

    async def models(self, neuron: NeuronState) -> list[ModelStatus]:
        return list(neuron.models.values())

    async def load(self, neuron: NeuronState, body: dict[str, Any]) -> ModelStatus | None:
        self.calls.append(("load", neuron.name, body))
        await trio.lowlevel.checkpoint()
        if self.refuse is not None:
            raise self.refuse
        return None

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        self.calls.append(("unload", neuron.name, model_id))
        await trio.lowlevel.checkpoint()

    discovery = health


def router(link: Link, *neurons: NeuronState) -> Router:
    state = FleetState.build([], ModelsFile(models=[M, OLD]), clock=lambda: NOW)
    for neuron in neurons:
        neuron.polled.set()
        state.neurons[neuron.name] = neuron
    config = GatewayConfig(routing=RoutingSection())
    return Router(config=config, state=state, api=link, metrics=GatewayMetrics.create())


def eviction(r: Router) -> scheduler.Decision:
    now = trio.current_time()
    decision = scheduler.decide(r.state, Request("m", now), now=now, policy=r.policy, queue=r.queue)
    assert decision.route.kind == "evict" and decision.route.plan.evictions == ["old"]
    return decision


async def carry_out(r: Router) -> PendingLoad:
    """Start the loader, hand it the eviction ``r`` decides on, and wait for the load to end."""
    decision = eviction(r)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(r.loader.run)
            load = r.loader.start(decision, "m")
            # Recorded before any await: no other request can plan with this room.
            assert r.state.pending == {("a", "m"): load}
            assert r.state.neurons["a"].evicting == {"old"} and load.reserve_mb == {0: 8 * GIB}
            await load.done.wait()
            nursery.cancel_scope.cancel()
    return load


async def test_a_decided_eviction_then_load_is_carried_out_in_order() -> None:
    link = Link()
    a = gpu("a", 16 * GIB, ("old", 12 * GIB, 3000))
    r = router(link, a)
    load = await carry_out(r)
    assert link.calls == [
        ("unload", "a", "old"),
        ("load", "a", {"model_id": "m", "source": "m", "harness": "llamacpp", "devices": [0]}),
    ]
    assert load.error is None and r.state.pending == {} and a.evicting == set()
    assert set(a.models) == {"m"} and a.models["m"].memory_mb == 8 * GIB
    assert "old" in r.thrash.evicted_at
    assert r.observations.load_s[("a", "m")].count == 1


CATALOGUE_AT_FAULT = "the catalogue entry for 'm' is invalid: "


@pytest.mark.parametrize(
    ("refused", "kind", "prefix"),
    [
        (UpstreamError("disk full"), UpstreamError, ""),
        # Refused as a bad request: the catalogue's entry is at fault, a 500
        # that blames no client.
        (RequestError("no such file"), InvalidCatalogueEntry, CATALOGUE_AT_FAULT),
        (InvalidModelOptions("unknown option 'n_ctxx'"), InvalidCatalogueEntry, CATALOGUE_AT_FAULT),
        (InvalidModelFile("truncated"), InvalidCatalogueEntry, CATALOGUE_AT_FAULT),
    ],
)
async def test_a_failed_load_ends_with_its_error(
    refused: CortexError, kind: type, prefix: str
) -> None:
    reason = refused.message
    link = Link(refuse=refused)
    a = gpu("a", 16 * GIB, ("old", 12 * GIB, 3000))
    r = router(link, a)
    load = await carry_out(r)
    assert type(load.error) is kind and load.error.status >= 500 and not load.replan
    assert load.error.message == f"{prefix}loading 'm' on a failed: {reason}"
    assert r.state.pending == {} and "m" not in a.models


@pytest.mark.parametrize(("need_mb", "replan"), [(9 * GIB, True), (8 * GIB, False)])
async def test_a_load_refused_for_want_of_memory_is_planned_again_if_it_needs_more(
    need_mb: int, replan: bool
) -> None:
    refused = InsufficientMemory(f"not enough memory for 'm': needs at least {need_mb} MiB")
    a = gpu("a", 16 * GIB, ("old", 12 * GIB, 3000))
    r = router(Link(refuse=refused), a)
    load = await carry_out(r)
    assert isinstance(load.error, InsufficientMemory) and load.replan is replan
    # More than the catalogue's 8 GiB: planned with what the neuron said from now on.
    entry = r.state.entry("m")
    assert entry is not None and entry.vram_mb == max(need_mb, M.vram_mb)


def test_a_model_without_vram_mb_is_planned_with_what_neurons_reported() -> None:
    bare = CatalogModel(id="bare", source="demo:gemma3")
    state = FleetState.build([], ModelsFile(models=[bare]), clock=lambda: NOW)
    state.neurons["a"] = gpu("a", 16 * GIB, ("bare", 900, 5))
    state.neurons["b"] = gpu("b", 16 * GIB, ("bare", 700, 5))
    assert state.sized(bare).vram_mb == 700  # the least reported
    state.neurons["a"].models.clear()
    state.neurons["b"].models.clear()
    assert state.sized(bare).vram_mb == 0  # nothing known yet
    state.reported(bare, 650)
    assert state.sized(bare).vram_mb == 650  # remembered once unloaded
    assert state.refused(bare, 800) and state.sized(bare).vram_mb == 800
    assert not state.refused(bare, 500) and state.sized(bare).vram_mb == 800
    # Another source under the same id is another model: nothing learned of it.
    assert state.sized(attrs.evolve(bare, source="demo")).vram_mb == 0
    # A vram_mb too low is raised to what a refusal said, never lowered.
    low, high = attrs.evolve(bare, vram_mb=100), attrs.evolve(bare, vram_mb=2000)
    assert state.sized(low).vram_mb == 800 and state.sized(high) is high


def test_a_neuron_is_planned_with_what_it_said_of_a_model_before_what_others_did() -> None:
    bare = CatalogModel(id="bare", source="demo")
    state = FleetState.build([], ModelsFile(models=[bare]), clock=lambda: NOW)
    big = state.neurons["big"] = gpu("big", 16 * GIB, ("bare", 258, 5))
    small = state.neurons["small"] = gpu("small", 16 * GIB)
    assert state.sized(bare).vram_mb == 258 and state.sized(bare, small).vram_mb == 258
    assert not state.measured_on(bare, small) and state.measured_on(bare, big)
    # small refuses it saying 165 MiB: less than big's, but its own.
    assert not state.refused(bare, 165, small)
    assert state.sized(bare, small).vram_mb == 165 and state.sized(bare, big).vram_mb == 258
    # Loaded there in 176: its own size, remembered once unloaded.
    state.reported(bare, 176, small)
    assert state.sized(bare, small).vram_mb == 176
    # A refusal there that says more than it was planned with there: plan again.
    assert state.refused(bare, 300, small) and state.sized(bare, small).vram_mb == 300
    assert state.sized(bare, big).vram_mb == 258


async def test_a_load_needs_the_loader_running() -> None:
    r = router(Link(), gpu("a", 16 * GIB, ("old", 12 * GIB, 3000)))
    with pytest.raises(RuntimeError, match=r"start Loader\.run first"):
        r.loader.start(eviction(r), "m")
    assert r.state.pending == {}


# -- the fleet state's named changes ----------------------------------------------------


async def test_a_finished_load_carries_its_error_and_wakes_everyone() -> None:
    a = gpu("a", 16 * GIB, ("old", 12 * GIB, 3000))
    state = FleetState.build([], ModelsFile(models=[M, OLD]), clock=lambda: NOW)
    state.neurons["a"] = a
    load = PendingLoad("a", "m", {0: 8 * GIB}, [0], ["old"])
    state.load_started(load)
    load.add_waiter()
    load.add_waiter()
    load.drop_waiter()
    assert load.waiters == 1 and a.evicting == {"old"}
    failed = UpstreamError("nope")
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state.wait_changed)
            await trio.testing.wait_all_tasks_blocked()
            state.load_finished(load, failed)
    assert load.done.is_set() and load.error is failed
    assert state.pending == {} and a.evicting == set()


def test_a_model_missing_on_its_neuron_is_dropped_and_the_neuron_polled() -> None:
    a = gpu("a", 24 * GIB, ("m", 8 * GIB, 5))
    state = FleetState.build([], ModelsFile(models=[M]), clock=lambda: NOW)
    state.neurons["a"] = a
    epoch = a.epoch
    state.model_missing(a, "m")
    assert "m" not in a.models and a.poke.is_set() and a.epoch == epoch + 1
    a.poke = trio.Event()
    state.model_missing(a, "m")  # not there: nothing to do
    assert not a.poke.is_set() and a.epoch == epoch + 1


def test_an_unloaded_model_is_gone_and_no_longer_evicting() -> None:
    a = gpu("a", 24 * GIB, ("m", 8 * GIB, 5), ("n", 8 * GIB, 5))
    a.begin_evicting(["m", "n"])
    a.model_unloaded("m")
    assert set(a.models) == {"n"} and a.evicting == {"n"}


def test_a_ticket_says_what_it_waits_for() -> None:
    ticket = WaitQueue(limit=2).enter("m", 1.0)
    ticket.wait_for("room", frozenset({"a"}))
    assert (ticket.waiting, ticket.wants) == ("room", frozenset({"a"}))
    ticket.wait_for("load")
    assert (ticket.waiting, ticket.wants) == ("load", frozenset())


# -- scale-in, decided ---------------------------------------------------------------


def replicas(*, idle: float, busy: int = 0, other: bool = True) -> tuple[FleetState, NeuronState]:
    added = gpu("added", 24 * GIB, ("m", 8 * GIB, idle))
    added.up = True
    if busy:
        added.in_flight["m"] = busy
    state = FleetState.build([], ModelsFile(models=[M]), clock=lambda: NOW)
    state.neurons["added"] = added
    if other:
        state.neurons["first"] = gpu("first", 24 * GIB, ("m", 8 * GIB, 1))
    return state, added


def test_an_added_replica_goes_once_idle_long_enough_with_another_left() -> None:
    queue = WaitQueue(limit=4)
    state, added = replicas(idle=400)
    assert scale_in(state, queue, added, "m", 300) == ScaleIn(unload=True)
    state, added = replicas(idle=100)
    assert scale_in(state, queue, added, "m", 300) == ScaleIn(recheck=200)
    state, added = replicas(idle=299.5)
    assert scale_in(state, queue, added, "m", 300) == ScaleIn(recheck=1.0)


def test_an_added_replica_stays_while_used_or_alone() -> None:
    queue = WaitQueue(limit=4)
    state, added = replicas(idle=400, busy=1)
    assert scale_in(state, queue, added, "m", 300) == ScaleIn(recheck=300)
    state, added = replicas(idle=400)
    queue.enter("m", 0.0)
    assert scale_in(state, queue, added, "m", 300) == ScaleIn(recheck=300)
    state, added = replicas(idle=400, other=False)
    assert scale_in(state, WaitQueue(limit=4), added, "m", 300) == ScaleIn(recheck=1.0)
    # A busy replica is never due, even with no idle time asked for.
    state, added = replicas(idle=0, busy=1)
    assert scale_in(state, queue, added, "m", 0) == ScaleIn(recheck=0)


def test_a_replica_gone_or_going_is_no_longer_watched() -> None:
    queue = WaitQueue(limit=4)
    state, added = replicas(idle=400)
    added.begin_evicting(["m"])
    assert scale_in(state, queue, added, "m", 300) == ScaleIn()
    added.model_unloaded("m")
    assert scale_in(state, queue, added, "m", 300) == ScaleIn()


def test_an_added_replica_pinned_where_it_is_stays() -> None:
    # A reload pinned it there since: the preloader would only load it back.
    state, added = replicas(idle=400)
    state.replace_catalogue(
        Catalogue.from_file(ModelsFile(models=[attrs.evolve(M, pinned_on=["added"])]))
    )
    assert scale_in(state, WaitQueue(limit=4), added, "m", 300) == ScaleIn()
