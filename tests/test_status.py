"""``cortex status`` against a real gateway (fake neurons behind it)."""

from __future__ import annotations

import json
import subprocess
import sys

import trio

from cortex import status as status_command
from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet


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
