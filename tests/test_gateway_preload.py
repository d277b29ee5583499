"""Pinned models are loaded where they are pinned (``cortex.gateway.preload``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cortex.config as cfg
from cortex.config import CatalogModel
from cortex.errors import ConfigError
from cortex.gateway.app import Gateway, make_client
from cortex.gateway.poller import refresh
from cortex.gateway.reload import reload_catalogue
from cortex.serve import serve
from tests.gateway_helpers import (
    FakeNeuron,
    Fleet,
    _config,
    catalogue,
    create_fake_app,
    running_fleet,
    start_fake,
)


async def _until(fleet: Fleet, done: Callable[[], bool]) -> None:
    """Return once ``done()`` holds, looking again at each change of the fleet state."""
    while not done():
        await fleet.state.wait_changed()


def _where(fleet: Fleet, model_id: str) -> dict[str, str]:
    """neuron -> status of ``model_id`` as /fleet (``cortex status``) shows it."""
    from cortex.gateway.fleetview import fleet_view

    (model,) = [m for m in fleet_view(fleet.state)["models"] if m["id"] == model_id]
    return {loc["neuron"]: loc["status"] for loc in model["locations"]}


def _loaded(fleet: Fleet, neuron: str, model_id: str) -> Callable[[], bool]:
    return lambda: fleet.state.neurons[neuron].status_of(model_id) == "loaded"


async def _metrics(fleet: Fleet) -> str:
    return (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text


async def test_a_pinned_model_is_loaded_where_it_is_pinned_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.gateway")
    a, b = FakeNeuron("a"), FakeNeuron("b")
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["b"]), CatalogModel(id="m/x"))
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            await _until(fleet, _loaded(fleet, "b", "m/p"))
            assert [c["model_id"] for c in b.load_calls] == ["m/p"]
            assert a.load_calls == []
            assert _where(fleet, "m/p") == {"b": "loaded"}
            view = (await fleet.client.get("/fleet")).json()
            (pinned,) = [m for m in view["models"] if m["id"] == "m/p"]
            assert pinned["locations"][0]["status"] == "loaded"
            metrics = await _metrics(fleet)
            assert 'cortex_cold_starts_total{model="m/p",neuron="b"} 1.0' in metrics
            assert 'cortex_model_load_seconds_count{model="m/p",neuron="b"} 1.0' in metrics
            # Served where it is, with no load of its own.
            assert (await fleet.chat("m/p")).status_code == 200
            assert len(b.load_calls) == 1 and a.load_calls == []
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "loading m/p on b, where it is pinned" in said


@pytest.mark.parametrize("policy", ["predictive", "fixed"])
async def test_a_request_during_the_preload_waits_on_it_rather_than_load_elsewhere(
    policy: str,
) -> None:
    # "a" has the same room and comes first by name: a cold request would go there.
    gate = trio.Event()
    a, b = FakeNeuron("a"), FakeNeuron("b", load_gate=gate)
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["b"]))
    answers: list[int] = []
    with trio.fail_after(10):
        async with running_fleet([a, b], models, routing={"policy": policy}) as fleet:
            await b.load_started.wait()
            assert _where(fleet, "m/p") == {"b": "loading"}

            async def ask() -> None:
                answers.append((await fleet.chat("m/p")).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                nursery.start_soon(ask)
                load = fleet.state.pending[("b", "m/p")]
                while load.waiters < 2:
                    await trio.testing.wait_all_tasks_blocked(0.01)
                assert a.load_calls == [] and len(b.load_calls) == 1
                gate.set()
            assert answers == [200, 200]
            assert a.load_calls == [] and len(b.load_calls) == 1
            assert [path for path, _, _ in b.requests] == ["/v1/chat/completions"] * 2


async def test_the_router_starts_a_due_preload_before_it_decides() -> None:
    # No preloader task here: a request that comes before it has looked at
    # a change (a neuron up) must not load the model elsewhere meanwhile.
    a, b = FakeNeuron("a"), FakeNeuron("b")
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["b"]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for fake in (a, b):
                await nursery.start(start_fake, fake)
            config = _config([a, b], "lru", None, {})
            async with make_client(config) as client:
                gateway = Gateway.build(config, models, client)
                await nursery.start(gateway.router.loader.run)
                for neuron in gateway.state.neurons.values():
                    neuron.discovery = await gateway.api.discovery(neuron)
                    await refresh(gateway.api, gateway.state, neuron)
                    neuron.polled.set()
                neuron = await gateway.router.acquire("m/p", exclude=set())
                assert neuron.name == "b"
                gateway.router.release(neuron, "m/p")
                assert a.load_calls == [] and len(b.load_calls) == 1
                nursery.cancel_scope.cancel()


async def _serve_on(fake: FakeNeuron, listen: str, *, task_status: Any) -> None:
    try:
        async with trio.open_nursery() as nursery:
            fake.url = await nursery.start(
                partial(
                    serve,
                    create_fake_app(fake),
                    listen,
                    default_port=0,
                    shutdown_trigger=fake.shutdown.wait,
                    grace_period=0.1,
                )
            )
            task_status.started()
    finally:
        fake.stopped.set()


async def test_a_pinned_model_is_loaded_again_when_its_neuron_comes_back_or_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.gateway")
    a, b = FakeNeuron("a"), FakeNeuron("b")
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["b"]))
    with trio.fail_after(15):
        async with running_fleet([a, b], models) as fleet:
            await _until(fleet, _loaded(fleet, "b", "m/p"))
            # b goes down (its process stops) ...
            listen = b.url.removeprefix("http://")
            b.shutdown.set()
            await b.stopped.wait()
            await fleet.refresh()
            assert not fleet.state.neurons["b"].up
            # ... and a new process, without the model, comes up where it was.
            again = FakeNeuron("b")
            async with trio.open_nursery() as nursery:
                await nursery.start(_serve_on, again, listen)
                try:
                    await fleet.refresh()
                    await _until(fleet, _loaded(fleet, "b", "m/p"))
                    assert [c["model_id"] for c in again.load_calls] == ["m/p"]
                    # Restarted between two polls: the gateway never saw it
                    # down, only that the model is gone.
                    again.loaded.clear()
                    await fleet.refresh()
                    await _until(fleet, _loaded(fleet, "b", "m/p"))
                    assert [c["model_id"] for c in again.load_calls] == ["m/p", "m/p"]
                    assert a.load_calls == []
                    metrics = await _metrics(fleet)
                    assert 'cortex_cold_starts_total{model="m/p",neuron="b"} 3.0' in metrics
                finally:
                    again.shutdown.set()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said.count("loading m/p on b, where it is pinned") == 3


async def test_a_reload_that_adds_a_pin_loads_the_model_there(tmp_path: Path) -> None:
    a, b = FakeNeuron("a"), FakeNeuron("b")
    models = catalogue(CatalogModel(id="m/p", vram_mb=100))
    path = tmp_path / "models.toml"
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            await fleet.refresh()
            assert a.load_calls == [] and b.load_calls == []
            path.write_text('[[models]]\nid = "m/p"\nvram_mb = 100\npinned_on = ["a"]\n')
            await reload_catalogue(fleet.state, str(path))
            await _until(fleet, _loaded(fleet, "a", "m/p"))
            assert [c["model_id"] for c in a.load_calls] == ["m/p"] and b.load_calls == []


async def test_no_preload_when_preload_pinned_is_off() -> None:
    a, b = FakeNeuron("a"), FakeNeuron("b")
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["b"]))
    with trio.fail_after(10):
        async with running_fleet([a, b], models, routing={"preload_pinned": False}) as fleet:
            await fleet.refresh()
            await fleet.refresh()
            assert a.load_calls == [] and b.load_calls == []
            assert _where(fleet, "m/p") == {}
            # Loaded on demand, as before.
            assert (await fleet.chat("m/p")).status_code == 200
            assert len(a.load_calls) + len(b.load_calls) == 1


async def test_a_failing_preload_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    a = FakeNeuron("a", failing={"m/p"})
    models = catalogue(CatalogModel(id="m/p", vram_mb=100, pinned_on=["a"]))
    with trio.fail_after(15):
        async with running_fleet([a], models) as fleet:
            await _until(fleet, lambda: len(a.load_calls) == 1 and not fleet.state.pending)
            failed = trio.current_time()
            # Polls (and requests) do not make it try again at once.
            for _ in range(3):
                await fleet.refresh()
            assert len(a.load_calls) == 1
            # After its back-off (1 s, then 2 s, ...) it does.
            await _until(fleet, lambda: len(a.load_calls) == 2)
            assert trio.current_time() - failed >= 0.9
            await _until(fleet, lambda: not fleet.state.pending)
            for _ in range(3):
                await fleet.refresh()
            assert len(a.load_calls) == 2
            # Fixed: loaded at the next try.
            a.failing.clear()
            await _until(fleet, _loaded(fleet, "a", "m/p"))
            assert len(a.load_calls) == 3
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "preloading m/p on a failed (1 in a row): trying again in 1 s" in said
    assert "preloading m/p on a failed (2 in a row): trying again in 2 s" in said


async def test_a_preload_refused_as_a_bad_request_waits_for_a_reload(tmp_path: Path) -> None:
    a = FakeNeuron("a", refuse_options={"n_gpu_layerz"})
    bad = CatalogModel(id="m/p", vram_mb=100, pinned_on=["a"], options={"n_gpu_layerz": 1})
    path = tmp_path / "models.toml"
    with trio.fail_after(10):
        async with running_fleet([a], catalogue(bad)) as fleet:
            await _until(fleet, lambda: fleet.state.invalid("m/p") is not None)
            for _ in range(3):
                await fleet.refresh()
            await trio.sleep(1.2)  # past the first back-off
            await fleet.refresh()
            assert len(a.load_calls) == 1
            path.write_text('[[models]]\nid = "m/p"\nvram_mb = 100\npinned_on = ["a"]\n')
            await reload_catalogue(fleet.state, str(path))
            await _until(fleet, _loaded(fleet, "a", "m/p"))
            assert len(a.load_calls) == 2


async def test_a_preload_evicts_nothing_and_waits_for_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = FakeNeuron(
        "a", memory_mb=1000, preload=["m/x"], sizes={"m/x": 800, "m/p": 400}, needs={"m/p": 400}
    )
    models = catalogue(
        CatalogModel(id="m/p", vram_mb=400, pinned_on=["a"]), CatalogModel(id="m/x", vram_mb=800)
    )
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            # The catalogue's vram_mb does not fit, but a has not said what
            # the model takes there: asked once, it refuses, saying so.
            await _until(fleet, lambda: len(a.load_calls) == 1 and not fleet.state.pending)
            for _ in range(3):
                await fleet.refresh()
            assert len(a.load_calls) == 1 and a.unload_calls == []
            preloader = fleet.handle.gateway.router.preloader
            assert preloader.statistics().waiting_for_room == 1
            assert preloader.statistics().backing_off == 0
            # The room comes (unloaded on the neuron): the next poll loads it.
            del a.loaded["m/x"]
            await fleet.refresh()
            await _until(fleet, _loaded(fleet, "a", "m/p"))
            assert [c["model_id"] for c in a.load_calls] == ["m/p", "m/p"]
            assert preloader.statistics().waiting_for_room == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        "cannot preload m/p on a, where it is pinned: it needs 400 MiB, 200 MiB free; "
        "loading it there once there is room (a preload evicts nothing)"
    ]


@pytest.mark.parametrize("need_mb", [165, 50])
async def test_a_preload_refused_for_want_of_memory_waits_for_room_and_says_so_once(
    caplog: pytest.LogCaptureFixture, need_mb: int
) -> None:
    # No size known anywhere: tried as it is; the neuron refuses it, saying
    # what it needs (50: less than it has free, by its own count).
    small = FakeNeuron(
        "small",
        memory_mb=500,
        preload=["m/x"],
        sizes={"m/x": 428, "m/p": 176},
        needs={"m/p": need_mb},
    )
    models = catalogue(CatalogModel(id="m/p", pinned_on=["small"]), CatalogModel(id="m/x"))
    with trio.fail_after(10):
        async with running_fleet([small], models) as fleet:
            await _until(fleet, lambda: len(small.load_calls) == 1 and not fleet.state.pending)
            # Asked once per change of its free memory at most: polls that
            # show the same do not ask again, nor does a back-off's end.
            for _ in range(3):
                await fleet.refresh()
            await trio.sleep(1.2)
            await fleet.refresh()
            assert len(small.load_calls) == 1
            preloader = fleet.handle.gateway.router.preloader
            assert preloader.statistics().backing_off == 0
            assert preloader.statistics().waiting_for_room == 1
            del small.loaded["m/x"]
            await fleet.refresh()
            await _until(fleet, _loaded(fleet, "small", "m/p"))
            assert len(small.load_calls) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        f"cannot preload m/p on small, where it is pinned: it needs {need_mb} MiB, 72 MiB free; "
        "loading it there once there is room (a preload evicts nothing)"
    ]


async def test_a_pinned_model_is_sized_by_its_own_neuron_not_by_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # big holds it in 258 MiB (a KV cache per slot); small would hold it in
    # 176 (unified) and has 248 free: 258 must not keep it from small.
    big = FakeNeuron("big", preload=["m/p"], sizes={"m/p": 258})
    small = FakeNeuron(
        "small", memory_mb=500, preload=["m/x"], sizes={"m/x": 252, "m/p": 176}, needs={"m/p": 165}
    )
    models = catalogue(CatalogModel(id="m/p", pinned_on=["small"]), CatalogModel(id="m/x"))
    with trio.fail_after(10):
        async with running_fleet([big, small], models) as fleet:
            assert fleet.state.sized(models.models[0]).vram_mb == 258
            await _until(fleet, _loaded(fleet, "small", "m/p"))
            assert [c["model_id"] for c in small.load_calls] == ["m/p"]
            assert fleet.state.neurons["small"].models["m/p"].memory_mb == 176
            # Planned with what each said of it from now on.
            entry = models.models[0]
            assert fleet.state.sized(entry, fleet.state.neurons["small"]).vram_mb == 176
            assert fleet.state.sized(entry, fleet.state.neurons["big"]).vram_mb == 258
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_pinned_model_a_neuron_refused_before_is_sized_by_that_refusal() -> None:
    # big holds it in 258 MiB; small, asked with 100 MiB free, refused it
    # saying 165: with 248 free later, small has the room by its own figure.
    big = FakeNeuron("big", preload=["m/p"], sizes={"m/p": 258})
    small = FakeNeuron(
        "small", memory_mb=500, preload=["m/x"], sizes={"m/x": 400, "m/p": 176}, needs={"m/p": 165}
    )
    models = catalogue(CatalogModel(id="m/p", pinned_on=["small"]), CatalogModel(id="m/x"))
    with trio.fail_after(10):
        async with running_fleet([big, small], models) as fleet:
            await _until(fleet, lambda: len(small.load_calls) == 1 and not fleet.state.pending)
            entry = models.models[0]
            assert fleet.state.sized(entry, fleet.state.neurons["small"]).vram_mb == 165
            small.loaded["m/x"]["memory_mb"] = 252
            await fleet.refresh()
            await _until(fleet, _loaded(fleet, "small", "m/p"))
            assert len(small.load_calls) == 2


def test_preload_pinned_is_on_by_default_and_takes_an_override() -> None:
    assert cfg.load(cfg.GatewayConfig, None, environ={}).routing.preload_pinned is True
    off = cfg.load(cfg.GatewayConfig, None, environ={"CORTEX_ROUTING_PRELOAD_PINNED": "false"})
    assert off.routing.preload_pinned is False
    with pytest.raises(ConfigError, match="preload_pinned"):
        cfg.load(cfg.GatewayConfig, None, environ={"CORTEX_ROUTING_PRELOAD_PINNED": "sometimes"})
