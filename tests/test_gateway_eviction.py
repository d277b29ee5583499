"""Placement and eviction: pure planning, then through a running gateway."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from cortex.config import CatalogModel, ModelsFile
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
from cortex.gateway import evictor
from cortex.gateway.reload import reload_catalogue
from cortex.gateway.state import HOST, FleetState, PendingLoad, feasible, place
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

# -- placement, pure ------------------------------------------------------------


def test_place_on_a_cpu_host() -> None:
    model = CatalogModel(id="m", vram_mb=500)
    assert place(model, {HOST: 600}) == []
    assert place(model, {HOST: 400}) is None


def test_place_on_gpus_uses_as_few_devices_as_allowed() -> None:
    model = CatalogModel(id="m", vram_mb=30000)
    # One 24 GB card is not enough; two split it 15 GB each.
    assert place(model, {0: 24000, 1: 24000}) == [0, 1]
    assert place(model, {0: 40000, 1: 24000}) == [0]
    assert place(model, {0: 10000, 1: 10000}) is None


def test_place_honours_min_devices_and_min_device_vram() -> None:
    model = CatalogModel(id="m", vram_mb=8000, min_devices=2, min_device_vram_mb=6000)
    assert place(model, {0: 24000}) is None
    assert place(model, {0: 5000, 1: 24000, 2: 7000}) == [1, 2]


def _gpu_state(models: list[ModelStatus], vram: list[int], used: list[int]) -> FleetState:
    # In the catalogue: only what the gateway could load back is evicted.
    state = FleetState.build([], ModelsFile(models=[CatalogModel(id=m.id) for m in models]))
    from cortex.gateway.state import NeuronState

    neuron = NeuronState(name="g", endpoint="http://x", up=True)
    neuron.discovery = Discovery(
        hostname="g",
        os="Linux",
        kernel="6",
        cpu=Cpu("x", 8),
        ram_total_mb=64000,
        devices=[Device(i, f"u{i}", "GPU", v, "8.9") for i, v in enumerate(vram)],
    )
    neuron.health = Health(
        uptime_secs=1,
        devices=[
            DeviceSample(i, u, v - u) for i, (v, u) in enumerate(zip(vram, used, strict=True))
        ],
        memory=MemoryBudget(64000, 0),
        activation=Activation(),
    )
    neuron.models = {m.id: m for m in models}
    state.neurons["g"] = neuron
    return state


def test_gpu_eviction_picks_victims_on_the_right_device() -> None:
    now = time.time()
    models = [
        ModelStatus(
            id="old-on-1",
            harness="x",
            status="loaded",
            devices=[1],
            memory_mb=20000,
            last_used=now - 100,
        ),
        ModelStatus(
            id="new-on-0",
            harness="x",
            status="loaded",
            devices=[0],
            memory_mb=20000,
            last_used=now - 10,
        ),
        ModelStatus(
            id="newer-on-1",
            harness="x",
            status="loaded",
            devices=[1],
            memory_mb=2000,
            last_used=now,
        ),
    ]
    state = _gpu_state(models, vram=[24000, 24000], used=[20000, 22000])
    want = CatalogModel(id="want", vram_mb=20000)
    plan = evictor.plan(state, state.neurons["g"], want, "lru")
    assert plan == evictor.Plan(devices=[1], evictions=["old-on-1"])
    assert feasible(want, state.neurons["g"])
    assert not feasible(CatalogModel(id="huge", vram_mb=60000), state.neurons["g"])


def test_pending_loads_reserve_memory() -> None:
    state = _gpu_state([], vram=[24000], used=[0])
    state.pending[("g", "other")] = PendingLoad(
        neuron="g", model_id="other", reserve_mb={0: 20000}, devices=[0], evictions=[]
    )
    assert (
        evictor.plan(state, state.neurons["g"], CatalogModel(id="m", vram_mb=8000), "lru") is None
    )
    assert evictor.plan(state, state.neurons["g"], CatalogModel(id="m", vram_mb=4000), "lru")


# -- through the gateway --------------------------------------------------------


def _models(**extra: dict) -> ModelsFile:
    ids = ["m/a", "m/b", "m/c"]
    return catalogue(*(CatalogModel(id=i, vram_mb=400, **extra.get(i, {})) for i in ids))


async def _use(fleet, *models: str) -> None:
    for model in models:
        response = await fleet.chat(model)
        assert response.status_code == 200, response.text


async def test_lru_model_is_evicted_to_make_room() -> None:
    a = FakeNeuron("a", memory_mb=1000, sizes={"m/a": 400, "m/b": 400, "m/c": 400})
    with trio.fail_after(10):
        async with running_fleet([a], _models()) as fleet:
            await _use(fleet, "m/a", "m/b", "m/a", "m/c")
            assert a.unload_calls == ["m/b"]
            assert set(a.loaded) == {"m/a", "m/c"}
            assert set(fleet.state.neurons["a"].models) == {"m/a", "m/c"}
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert 'cortex_evictions_total{model="m/b",neuron="a"} 1.0' in metrics
            assert 'cortex_cold_starts_total{model="m/c",neuron="a"} 1.0' in metrics
            # Preloads of pinned models count too (test_gateway_preload): the help says so.
            assert (
                "# HELP cortex_cold_starts_total Loads this gateway started, "
                "for a request or to preload a pinned model."
            ) in metrics


async def test_pinned_model_is_never_evicted() -> None:
    a = FakeNeuron("a", memory_mb=1000, sizes={"m/a": 400, "m/b": 400, "m/c": 400})
    models = _models(**{"m/a": {"pinned_on": ["a"]}})
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            await _use(fleet, "m/a", "m/b", "m/c")
            assert a.unload_calls == ["m/b"]
            # Only m/c can go now (m/a is pinned).
            await _use(fleet, "m/b")
            assert a.unload_calls == ["m/b", "m/c"]
            assert "m/a" in a.loaded


async def test_model_with_requests_in_flight_is_not_evicted() -> None:
    hold = trio.Event()
    a = FakeNeuron("a", memory_mb=1000, preload=["m/a", "m/b"], sizes={"m/a": 400, "m/b": 400})
    with trio.fail_after(10):
        async with running_fleet([a], _models()) as fleet:
            await _use(fleet, "m/b", "m/a")  # m/b is the least recently used
            a.hold, a.request_arrived = hold, trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.chat, "m/b")
                await a.request_arrived.wait()
                a.hold = None
                await _use(fleet, "m/c")
                hold.set()
            assert a.unload_calls == ["m/a"]


async def test_nothing_evictable_is_503_with_retry_after() -> None:
    a = FakeNeuron("a", memory_mb=1000, preload=["m/a", "m/b"], sizes={"m/a": 400, "m/b": 400})
    models = _models(**{"m/a": {"pinned_on": ["a"]}, "m/b": {"pinned_on": ["a"]}})
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            response = await fleet.chat("m/c")
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["error"]["type"] == "server_error"
            assert a.load_calls == [] and a.unload_calls == []


async def test_priority_strategy_evicts_the_lowest_priority_first() -> None:
    a = FakeNeuron("a", memory_mb=1000, sizes={"m/a": 400, "m/b": 400, "m/c": 400})
    models = _models(**{"m/a": {"priority": 1}, "m/b": {"priority": 5}})
    with trio.fail_after(10):
        async with running_fleet([a], models, strategy="priority") as fleet:
            # m/a is the most recently used, but the lowest priority.
            await _use(fleet, "m/b", "m/a", "m/c")
            assert a.unload_calls == ["m/a"]


async def test_model_too_big_for_every_neuron_is_404() -> None:
    a = FakeNeuron("a", memory_mb=1000)
    models = catalogue(CatalogModel(id="m/huge", vram_mb=5000))
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            response = await fleet.chat("m/huge")
            assert response.status_code == 404
            assert "fits on no neuron" in response.json()["error"]["message"]


async def test_a_tier_or_alias_that_fits_nowhere_is_named_as_the_client_asked() -> None:
    """The 404 names the tier or alias asked for, and the model it was routed to."""
    a = FakeNeuron("a", memory_mb=1000)
    models = ModelsFile(
        models=[CatalogModel(id="huge", vram_mb=5000)],
        aliases={"tier/bad": ["huge"], "big": "huge"},
    )
    needs = "fits on no neuron of the fleet (needs 5000 MiB"
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            response = await fleet.chat("tier/bad")
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert error["message"].startswith(
                f"model 'tier/bad' (a tier, its member 'huge') {needs}"
            )
            assert error["param"] == "model" and error["code"] == "model_not_found"
            response = await fleet.client.post(
                "/v1/messages",
                json={
                    "model": "big",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert response.status_code == 404, response.text
            body = response.json()
            assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
            assert body["error"]["message"].startswith(f"model 'big' (an alias of 'huge') {needs}")
            # Asked for by its id: the id alone.
            response = await fleet.chat("huge")
            assert response.json()["error"]["message"].startswith(f"model 'huge' {needs}")


async def test_gpu_neuron_gets_devices_in_the_load() -> None:
    a = FakeNeuron("a", gpus=[8000, 24000])
    models = catalogue(CatalogModel(id="m/gpu", vram_mb=16000))
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            await _use(fleet, "m/gpu")
            assert a.load_calls[0]["devices"] == [1]


@pytest.mark.parametrize("policy", ["predictive", "fixed"])
async def test_a_model_the_gateway_could_not_load_back_is_never_evicted(policy: str) -> None:
    # "keepme" came with the neuron's start (or another gateway): it is not in
    # this catalogue, so evicting it would lose it for good.
    a = FakeNeuron("a", memory_mb=1000, preload=["keepme"], sizes={"keepme": 700, "m/a": 400})
    with trio.fail_after(10):
        async with running_fleet([a], _models(), routing={"policy": policy}) as fleet:
            response = await fleet.chat("m/a")
            # As if it were pinned: no room, and waiting cannot make any.
            assert response.status_code == 503, response.text
            assert response.json()["error"]["message"] == (
                "no room for 'm/a' on a now: it needs 400 MiB, and at most 300 MiB could be free "
                "there after evicting every model that may be evicted "
                "(not this gateway's to load back: 'keepme')"
            )
            assert a.unload_calls == [] and a.load_calls == []
            await _use(fleet, "keepme")
            view = (await fleet.client.get("/fleet")).json()
            (keepme,) = [m for m in view["models"] if m["id"] == "keepme"]
            assert keepme["in_catalogue"] is False and keepme["pinned_on"] == ["a"]


async def test_no_room_says_how_much_memory_is_short_and_which_models_stay() -> None:
    # 72 MiB free; evicting the idle "smollm2-b" would leave 248: not the 322 needed.
    sizes = {"smollm2": 252, "smollm2-b": 176, "gemma-d": 322}
    small = FakeNeuron("small", memory_mb=500, preload=["smollm2", "smollm2-b"], sizes=sizes)
    models = catalogue(
        CatalogModel(id="smollm2", vram_mb=252, pinned_on=["small"]),
        CatalogModel(id="smollm2-b", vram_mb=176),
        CatalogModel(id="gemma-d", vram_mb=322),
    )
    why = (
        "no room for 'gemma-d' on small now: it needs 322 MiB, and at most 248 MiB could be "
        "free there after evicting every model that may be evicted (pinned there: 'smollm2')"
    )
    with trio.fail_after(10):
        async with running_fleet([small], models) as fleet:
            response = await fleet.chat("gemma-d")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["message"] == why
            assert int(response.headers["retry-after"]) >= 1
            response = await fleet.client.post(
                "/v1/messages",
                json={
                    "model": "gemma-d",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert response.status_code == 529, response.text
            assert response.json()["error"] == {"type": "overloaded_error", "message": why}
            assert small.unload_calls == [] and small.load_calls == []


async def test_no_room_names_the_neuron_that_has_the_model_and_is_down() -> None:
    sizes = {"smollm2": 252, "gemma": 322}
    big = FakeNeuron("big", memory_mb=1000, preload=["gemma"], sizes=sizes)
    small = FakeNeuron("small", memory_mb=500, preload=["smollm2"], sizes=sizes)
    models = catalogue(
        CatalogModel(id="smollm2", vram_mb=252, pinned_on=["small"]),
        CatalogModel(id="gemma", vram_mb=322, pinned_on=["big"]),
    )
    with trio.fail_after(10):
        async with running_fleet([big, small], models) as fleet:
            big.shutdown.set()  # as good as SIGSTOPped: its polls fail
            await big.stopped.wait()
            await fleet.refresh()
            response = await fleet.chat("gemma")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["message"] == (
                "no room for 'gemma' on small now: it needs 322 MiB, and at most 248 MiB could "
                "be free there after evicting every model that may be evicted "
                "(pinned there: 'smollm2'); big, where it is loaded, is down"
            )


async def test_no_room_names_the_busy_models_when_the_policy_does_not_wait() -> None:
    sizes = {"m/a": 600, "m/b": 600}
    a = FakeNeuron("a", memory_mb=1000, preload=["m/a"], sizes=sizes, hold=trio.Event())
    models = catalogue(CatalogModel(id="m/a", vram_mb=600), CatalogModel(id="m/b", vram_mb=600))
    with trio.fail_after(10):
        async with running_fleet([a], models, routing={"policy": "fixed"}) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.chat, "m/a")
                await a.request_arrived.wait()
                response = await fleet.chat("m/b")
                assert a.hold is not None
                a.hold.set()
            assert response.status_code == 503, response.text
            assert response.json()["error"]["message"] == (
                "no room for 'm/b' on a now: the models that could make room are busy "
                "('m/a': requests in flight or waiting, or a load or unload under way)"
            )
            assert a.unload_calls == []


async def test_a_catalogue_entry_a_neuron_refused_evicts_nothing_until_a_reload(
    tmp_path,
) -> None:
    # Both neurons are full; "bad" would need an eviction on either.
    sizes = {"m/a": 600, "m/b": 600, "bad": 600}
    a = FakeNeuron("a", memory_mb=1000, preload=["m/a"], sizes=sizes, refuse_options={"n_ctxx"})
    b = FakeNeuron("b", memory_mb=1000, preload=["m/b"], sizes=sizes, refuse_options={"n_ctxx"})
    bad = CatalogModel(id="bad", vram_mb=600, options={"n_ctxx": 2048})
    models = catalogue(
        CatalogModel(id="m/a", vram_mb=600), CatalogModel(id="m/b", vram_mb=600), bad
    )
    with trio.fail_after(10):
        async with running_fleet([a, b], models) as fleet:
            first = await fleet.chat("bad")
            assert first.status_code == 500, first.text
            assert first.json()["error"]["code"] == "invalid_catalogue_entry"
            # One eviction to find out, on one neuron; not one on the other.
            assert len(a.unload_calls + b.unload_calls) == 1
            evicted = a.unload_calls + b.unload_calls
            second = await fleet.chat("bad")
            assert second.status_code == 500, second.text
            assert second.json()["error"] == first.json()["error"]
            assert a.unload_calls + b.unload_calls == evicted
            assert len(a.load_calls + b.load_calls) == 1
            view = (await fleet.client.get("/fleet")).json()
            (entry,) = [m for m in view["models"] if m["id"] == "bad"]
            assert "n_ctxx" in entry["error"]
            # Not "available": clients listing models see it cannot be used.
            listed = (await fleet.client.get("/v1/models/bad")).json()
            assert listed["status"] == "invalid" and listed["loaded"] is False
            assert listed["error"] == entry["error"]
            data = (await fleet.client.get("/v1/models")).json()["data"]
            assert [m["status"] for m in data if m["id"] == "bad"] == ["invalid"]
            path = tmp_path / "models.toml"
            path.write_text(
                '[[models]]\nid = "m/a"\nvram_mb = 600\n'
                '[[models]]\nid = "m/b"\nvram_mb = 600\n'
                '[[models]]\nid = "bad"\nvram_mb = 600\noptions = { n_ctx = 2048 }\n'
            )
            await reload_catalogue(fleet.state, str(path))
            fixed = await fleet.chat("bad")
            assert fixed.status_code == 200, fixed.text
            view = (await fleet.client.get("/fleet")).json()
            (entry,) = [m for m in view["models"] if m["id"] == "bad"]
            assert entry["error"] is None
            listed = (await fleet.client.get("/v1/models/bad")).json()
            assert listed["status"] == "loaded" and "error" not in listed


async def test_a_model_a_reload_retired_is_served_while_loaded_and_evicted_first(
    tmp_path,
) -> None:
    sizes = {"m/a": 400, "m/b": 400, "m/c": 400}
    a = FakeNeuron("a", memory_mb=1000, sizes=sizes)
    with trio.fail_after(10):
        async with running_fleet([a], _models()) as fleet:
            await _use(fleet, "m/b", "m/a")
            path = tmp_path / "models.toml"
            path.write_text(
                '[[models]]\nid = "m/b"\nvram_mb = 400\n[[models]]\nid = "m/c"\nvram_mb = 400\n'
            )
            await reload_catalogue(fleet.state, str(path))
            # Still loaded: served by its id.
            await _use(fleet, "m/a")
            view = (await fleet.client.get("/fleet")).json()
            (retired,) = [m for m in view["models"] if m["id"] == "m/a"]
            assert retired["retired"] is True and retired["pinned_on"] == []
            # The most recently used, yet the first to go: nothing loads it again.
            await _use(fleet, "m/c")
            assert a.unload_calls == ["m/a"]
            response = await fleet.chat("m/a")
            assert response.status_code == 404, response.text


async def test_a_model_a_reload_retired_blocks_no_load(tmp_path) -> None:
    a = FakeNeuron("a", memory_mb=1000, sizes={"m/a": 700, "m/c": 400})
    models = catalogue(CatalogModel(id="m/a", vram_mb=700))
    with trio.fail_after(10):
        async with running_fleet([a], models) as fleet:
            await _use(fleet, "m/a")
            path = tmp_path / "models.toml"
            path.write_text('[[models]]\nid = "m/c"\nvram_mb = 400\n')
            await reload_catalogue(fleet.state, str(path))
            await _use(fleet, "m/c")
            assert a.unload_calls == ["m/a"]


async def test_a_model_retired_while_it_loads_is_served_once_loaded(tmp_path) -> None:
    gate = trio.Event()
    a = FakeNeuron("a", memory_mb=1000, load_gate=gate)
    with trio.fail_after(10):
        async with running_fleet([a], _models()) as fleet, trio.open_nursery() as nursery:
            answers: list[int] = []

            async def use(model: str) -> None:
                answers.append((await fleet.chat(model)).status_code)

            nursery.start_soon(use, "m/a")
            await a.load_started.wait()
            path = tmp_path / "models.toml"
            path.write_text('[[models]]\nid = "m/b"\nvram_mb = 400\n')
            await reload_catalogue(fleet.state, str(path))
            nursery.start_soon(use, "m/a")
            load = fleet.state.pending[("a", "m/a")]
            while load.waiters < 2 and not answers:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            gate.set()
        assert answers == [200, 200]
