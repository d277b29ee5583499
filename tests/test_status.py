"""``cortex status`` against a real gateway (fake neurons behind it)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from functools import partial

import httpx
import trio

from cortex import status as status_command
from cortex.config import CatalogModel, GatewayConfig, GatewaySection, NeuronEndpoint
from cortex.gateway.app import run_gateway
from cortex.gateway.reload import reload_catalogue
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet, start_fake


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_status_table_and_json() -> None:
    models = catalogue(
        CatalogModel(id="org/big", vram_mb=100, pinned_on=["gpu"]),
        CatalogModel(id="small", vram_mb=100),
        aliases={"tier/small": "small", "tier/any": ["small", "org/big"]},
    )
    fakes = [
        FakeNeuron("gpu", gpus=[24000, 24000], preload=["org/big"]),
        FakeNeuron("cpu", memory_mb=4000),
    ]
    async with running_fleet(fakes, models) as fleet:
        with trio.fail_after(30):
            fakes[1].shutdown.set()  # one neuron goes away
            table = await trio.to_thread.run_sync(status, "--gateway", fleet.handle.api_url)
            raw = await trio.to_thread.run_sync(status, "--gateway", fleet.handle.api_url, "--json")
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "NEURONS" in text and "MODELS" in text and "ALIASES" in text
    assert "gpu" in text and "org/big" in text and "gpu (loaded)" in text
    assert "tier/small" in text
    # The tier JSON has under "tiers" is a row too, its members in order.
    [tier] = [line for line in text.splitlines() if line.startswith("tier/any ")]
    assert tier.split(None, 1)[1] == "tier: small, org/big"
    document = json.loads(raw.stdout)
    gpu = next(n for n in document["neurons"] if n["name"] == "gpu")
    assert gpu["up"] and len(gpu["devices"]) == 2
    big = next(m for m in document["models"] if m["id"] == "org/big")
    assert big["pinned_on"] == ["gpu"]
    assert big["locations"][0]["status"] == "loaded"


def test_status_unreachable_gateway() -> None:
    result = status("--gateway", "http://127.0.0.1:9")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the gateway" in lines[0]


async def test_a_dead_neurons_models_show_as_unreachable() -> None:
    models = catalogue(CatalogModel(id="small", vram_mb=100))
    a = FakeNeuron("a", preload=["small"])
    a.in_flight["small"] = 2  # others' requests, as the neuron reports them
    async with running_fleet([a], models) as fleet:
        with trio.fail_after(30):
            await fleet.refresh()
            before = (await fleet.client.get("/fleet")).json()
            assert before["models"][0]["locations"][0]["in_flight"] == 2
            a.shutdown.set()
            await a.stopped.wait()
            await fleet.refresh()
            document = (await fleet.client.get("/fleet")).json()
            health = (await fleet.client.get("/health")).json()
    (neuron,) = document["neurons"]
    assert not neuron["up"] and neuron["in_flight"] is None and neuron["queue_depth"] is None
    (location,) = document["models"][0]["locations"]
    assert location["status"] == "unreachable" and location["in_flight"] == 0
    assert health["neurons"][0]["models"] == {"small": "unreachable"}
    text = status_command.render(document)
    assert "a (unreachable)" in text and "loaded" not in text
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert row.split()[1] == "down"


async def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    import os

    models = catalogue(CatalogModel(id="small", vram_mb=100))
    async with running_fleet([FakeNeuron("a")], models) as fleet:
        read, write = os.pipe()
        os.close(read)  # as head does once it has its lines
        try:
            with trio.fail_after(30):
                url = fleet.handle.api_url
                for args in (["--gateway", url], ["--gateway", url, "--json"]):
                    done = await trio.to_thread.run_sync(
                        lambda args=args: subprocess.run(
                            [sys.executable, "-m", "cortex", "status", *args],
                            stdout=write,
                            stderr=subprocess.PIPE,
                            text=True,
                            timeout=60,
                        )
                    )
                    assert (done.returncode, done.stderr) == (0, "")
        finally:
            os.close(write)


async def test_a_neuron_never_reached_is_logged_with_the_reason(caplog) -> None:
    # Three ways to get a neuron wrong from the start (a URL without its
    # scheme is refused at load: tests/test_config.py); each is logged once,
    # with its reason, and /health says the same.
    good = FakeNeuron("good", token="right")
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_fake, good)
        endpoints = [
            NeuronEndpoint("dead", f"http://127.0.0.1:{dead_port}"),
            NeuronEndpoint("v1", f"{good.url}/v1", "right"),
            NeuronEndpoint("token", good.url, "wrong"),
        ]
        config = GatewayConfig(
            gateway=GatewaySection(
                listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", poll_interval=3600.0
            ),
            neurons=endpoints,
        )
        shutdown = trio.Event()
        with caplog.at_level(logging.WARNING, logger="cortex.gateway.poller"):
            with trio.fail_after(30):
                handle = await nursery.start(
                    partial(run_gateway, config, catalogue(), shutdown=shutdown)
                )
                await handle.state.wait_polled()
                async with httpx.AsyncClient(base_url=handle.api_url) as client:
                    health = (await client.get("/health")).json()
                    fleet = (await client.get("/fleet")).json()
                for neuron in handle.state.neurons.values():  # a second poll: no new lines
                    neuron.polled = trio.Event()
                    neuron.poke.set()
                    await neuron.polled.wait()
            shutdown.set()
            good.shutdown.set()
    errors = {n["name"]: n["error"] for n in health["neurons"]}
    assert not any(n["up"] for n in health["neurons"])
    assert "unreachable" in errors["dead"]
    assert "answered 404 to GET " + good.url + "/v1/discovery" in errors["v1"]
    assert "does not look like a cortex neuron" in errors["v1"]
    assert "refused the gateway's token" in errors["token"]
    # Never reached: its devices are not known, not a host without GPUs.
    assert all(n["devices"] is None for n in fleet["neurons"])
    text = status_command.render(fleet)
    for name in errors:
        (row,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
        assert "cpu" not in row.split() and row.split()[3] == "-", row
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 3, logged
    for name, error in errors.items():
        (line,) = [message for message in logged if message.startswith(f"neuron {name} ")]
        assert line.endswith(error)


async def test_status_marks_a_retired_model_and_says_why_one_fits_nowhere(tmp_path) -> None:
    models = catalogue(
        CatalogModel(id="old", vram_mb=100),
        CatalogModel(id="huge", vram_mb=100_000),
    )
    a = FakeNeuron("a", memory_mb=1000, preload=["old"])
    async with running_fleet([a], models) as fleet:
        with trio.fail_after(30):
            listed = (await fleet.client.get("/v1/models")).json()
            path = tmp_path / "models.toml"
            path.write_text('[[models]]\nid = "huge"\nvram_mb = 100000\n')
            await reload_catalogue(fleet.state, str(path))
            table = await trio.to_thread.run_sync(status, "--gateway", fleet.handle.api_url)
    (huge,) = [m for m in listed["data"] if m["id"] == "huge"]
    assert huge["status"] == "unavailable" and huge["feasible_on"] == []
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    (old,) = [line for line in lines if line.startswith("old ")]
    assert old.startswith("old (retired) ") and "a (loaded)" in old
    (note,) = [line for line in lines if line.startswith("  huge: ")]
    assert "fits on no neuron of the fleet (needs 100000 MiB" in note


async def test_status_says_why_a_catalogue_entry_cannot_be_served() -> None:
    bad = CatalogModel(id="bad", vram_mb=100, options={"n_ctxx": 2048})
    a = FakeNeuron("a", memory_mb=1000, refuse_options={"n_ctxx"})
    async with running_fleet([a], catalogue(CatalogModel(id="small", vram_mb=100), bad)) as fleet:
        with trio.fail_after(30):
            response = await fleet.chat("bad")
            assert response.status_code == 500, response.text
            table = await trio.to_thread.run_sync(status, "--gateway", fleet.handle.api_url)
    assert table.returncode == 0, table.stderr
    [line] = [line for line in table.stdout.splitlines() if line.startswith("  bad: ")]
    assert "n_ctxx" in line


async def test_the_metrics_port_answers_404_off_metrics_so_a_misplaced_neuron_says_so() -> None:
    # A [[neurons]] entry pointed at a gateway's metrics_listen by mistake:
    # that port serves /metrics only, so the poll's 404 names the path asked.
    async with running_fleet([FakeNeuron("a")], catalogue()) as first:
        metrics_url = first.handle.metrics_url
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=metrics_url) as client:
                scrape = await client.get("/metrics")
                off = {path: await client.get(path) for path in ("/nonexistent", "/discovery", "/")}
            config = GatewayConfig(
                gateway=GatewaySection(
                    listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", poll_interval=3600.0
                ),
                neurons=[NeuronEndpoint("m", metrics_url)],
            )
            async with trio.open_nursery() as nursery:
                shutdown = trio.Event()
                second = await nursery.start(
                    partial(run_gateway, config, catalogue(), shutdown=shutdown)
                )
                await second.state.wait_polled()
                async with httpx.AsyncClient(base_url=second.api_url) as client:
                    health = (await client.get("/health")).json()
                shutdown.set()
    assert scrape.status_code == 200 and "cortex_requests_total" in scrape.text
    for path, answer in off.items():
        assert answer.status_code == 404, (path, answer.text)
        assert answer.headers["content-type"].startswith("text/plain")
        assert path in answer.text and "/metrics" in answer.text
    (neuron,) = health["neurons"]
    assert f"answered 404 to GET {metrics_url}/discovery" in neuron["error"]


async def test_a_neuron_entry_pointed_at_the_gateways_own_metrics_port_is_answered() -> None:
    # The pollers start once the metrics port listens: the first poll gets
    # the 404 naming the path, not a refused connection.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics_url = f"http://127.0.0.1:{port}"
    config = GatewayConfig(
        gateway=GatewaySection(
            listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{port}", poll_interval=3600.0
        ),
        neurons=[NeuronEndpoint("self", metrics_url)],
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            gateway = await nursery.start(
                partial(run_gateway, config, catalogue(), shutdown=shutdown)
            )
            await gateway.state.wait_polled()
            error = gateway.state.neurons["self"].last_error
            shutdown.set()
    assert f"answered 404 to GET {metrics_url}/discovery" in (error or "")
