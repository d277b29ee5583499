"""Stall detection: a model whose engine hangs while its neuron still answers.

Real neurons with the fake engine (``cortex.testing.FakeEngine``: its
``wedged`` hangs a generation with no progress, its ``prompt_delay`` is a
long prompt whose progress count moves) behind a real gateway whose
pollers poll every 50 ms.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from cortex import status as status_command
from cortex.config import CatalogModel, GatewayConfig, GatewaySection, ModelsFile, NeuronEndpoint
from cortex.gateway.app import GatewayHandle, run_gateway
from cortex.harness import Sampling
from cortex.neuron.workers import GenerationRequest, GenerationWorker, Job, collect
from cortex.testing import FakeEngine, FakeModel
from tests.neuron_helpers import running_neuron

BODY = {"model": "m", "prompt": "go", "max_tokens": 32}
STALLS = 'cortex_model_stalls_total{model="m",neuron="a"}'


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "m.fake"
    path.write_text("fake")
    return str(path)


def catalogue(source: str) -> ModelsFile:
    return ModelsFile(models=[CatalogModel(id="m", source=source, vram_mb=1)])


@asynccontextmanager
async def gateway_over(
    models: ModelsFile, neurons: dict[str, str], **section: Any
) -> AsyncIterator[tuple[GatewayHandle, httpx.AsyncClient]]:
    """A gateway on port 0 over ``neurons`` (name -> URL) polling every 50 ms, and a client."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "grace_period": 1.0,
        "poll_interval": 0.05,
        "first_byte_timeout": 60.0,
        "stall_timeout": 0.5,
    }
    settings.update(section)
    config = GatewayConfig(
        gateway=GatewaySection(**settings),
        neurons=[NeuronEndpoint(name, url) for name, url in neurons.items()],
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
        try:
            async with httpx.AsyncClient(base_url=gw.api_url, timeout=90) as http:
                await gw.state.wait_polled()
                yield gw, http
        finally:
            shutdown.set()


@asynccontextmanager
async def released(wedged: threading.Event) -> AsyncIterator[None]:
    """Set ``wedged`` on the way out: the hung thread ends, or its neuron's
    shutdown would wait for it forever."""
    try:
        yield
    finally:
        wedged.set()


async def metrics(gw: GatewayHandle, http: httpx.AsyncClient) -> str:
    return (await http.get(gw.metrics_url + "/metrics")).text


async def test_a_request_on_a_wedged_model_fails_over_long_before_first_byte_timeout(
    source: str, caplog: pytest.LogCaptureFixture
) -> None:
    """a has the model loaded and hangs in it; b is empty and healthy.

    The request goes to a's loaded replica; once a says the model has had a
    request without progress for longer than stall_timeout, the request
    moves to b (a cold load there) and is answered, an hour of
    first_byte_timeout notwithstanding. The stall is logged and counted
    once, shown in /fleet and ``cortex status``; new requests go to b
    straight away; once a's engine moves again, a is a route again.
    """
    caplog.set_level(logging.INFO, logger="cortex")
    wedged = threading.Event()
    hung = FakeEngine(reply=lambda prompt: "from a", wedged=wedged)
    healthy = FakeEngine(reply=lambda prompt: "from b")
    with trio.fail_after(30):
        async with (
            running_neuron([("m", source)], plugins=[hung]) as a,
            running_neuron(plugins=[healthy]) as b,
            released(wedged),
            gateway_over(
                catalogue(source), {"a": a.url, "b": b.url}, first_byte_timeout=3600.0
            ) as (gw, http),
        ):
            started = trio.current_time()
            reply = await http.post("/v1/completions", json=BODY)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == "from b"
            assert trio.current_time() - started < 10
            assert "request" in caplog.text and "made no progress" in caplog.text
            # a's request is still stuck in its engine: a says so.
            neuron = gw.state.neurons["a"]
            assert neuron.models["m"].in_flight == 1
            assert neuron.models["m"].stalled_secs > 0.5
            assert neuron.stalled == {"m"}
            fleet = (await http.get("/fleet")).json()
            [model] = fleet["models"]
            where = {loc["neuron"]: loc for loc in model["locations"]}
            assert where["a"]["status"] == "stalled" and where["a"]["stalled_secs"] > 0.5
            assert where["b"]["status"] == "loaded" and where["b"]["stalled_secs"] == 0
            text = status_command.render(fleet)
            assert "a (stalled), b (loaded)" in text
            assert "m on a: no progress for" in text

            # The next request goes to b at once, not to a first.
            reply = await http.post("/v1/completions", json=BODY)
            assert reply.json()["choices"][0]["text"] == "from b"
            assert caplog.text.count("trying the next route") == 1
            assert caplog.text.count("has made no progress") == 1
            assert f"{STALLS} 1.0" in await metrics(gw, http)

            wedged.set()
            while neuron.stalled:
                await gw.state.wait_changed()
            assert "model m on neuron a is making progress again" in caplog.text
            fleet = (await http.get("/fleet")).json()
            where = {loc["neuron"]: loc for loc in fleet["models"][0]["locations"]}
            assert where["a"]["status"] == "loaded"


@pytest.mark.parametrize("counts", [True, False], ids=["counting", "not-counting"])
async def test_a_slow_prompt_that_makes_progress_is_not_given_up(
    source: str, counts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2 s prompt with a 0.5 s stall_timeout: answered from its neuron, never stalled.

    Counting, the engine's progress moves all along; not counting (an
    engine that cannot tell), it is never judged at all.
    """
    slow = FakeEngine(
        reply=lambda prompt: "late but fine", prompt_delay=2.0, counts_progress=counts
    )
    seen: list[float] = []
    with trio.fail_after(30):
        async with (
            running_neuron([("m", source)], plugins=[slow]) as a,
            gateway_over(catalogue(source), {"a": a.url}) as (gw, http),
        ):

            async def watch() -> None:
                while True:
                    await gw.state.wait_changed()
                    if "m" in gw.state.neurons["a"].models:
                        seen.append(gw.state.neurons["a"].models["m"].stalled_secs)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                started = trio.current_time()
                reply = await http.post("/v1/completions", json=BODY)
                nursery.cancel_scope.cancel()
            assert trio.current_time() - started >= 2.0
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == "late but fine"
            assert len(seen) > 10 and max(seen) < 0.5
            assert STALLS not in await metrics(gw, http)
    assert "made no progress" not in caplog.text


@pytest.mark.parametrize(
    ("stall_timeout", "status", "message"),
    [
        (0.5, 503, "model m on neuron a made no progress"),
        (0.0, 504, "neuron a sent nothing within 4 s"),
    ],
    ids=["detected", "off"],
)
async def test_with_no_other_route_a_wedged_model_is_an_error(
    source: str, stall_timeout: float, status: int, message: str
) -> None:
    """Alone, the wedged model's request ends with the stall as the reason, at
    once; with stall_timeout 0 nothing is judged: it waits out first_byte_timeout."""
    wedged = threading.Event()
    hung = FakeEngine(wedged=wedged)
    with trio.fail_after(30):
        async with (
            running_neuron([("m", source)], plugins=[hung]) as a,
            released(wedged),
            gateway_over(
                catalogue(source),
                {"a": a.url},
                stall_timeout=stall_timeout,
                first_byte_timeout=4.0,
            ) as (gw, http),
        ):
            started = trio.current_time()
            reply = await http.post("/v1/completions", json=BODY)
            elapsed = trio.current_time() - started
            assert reply.status_code == status, reply.text
            assert message in reply.json()["error"]["message"]
            assert elapsed < 3.5 if stall_timeout else elapsed >= 4.0
            stalls = f"{STALLS} 1.0" in await metrics(gw, http)
            assert stalls == bool(stall_timeout)


def job(buffer: int = 64) -> Job:
    request = GenerationRequest(tokens=[1, 2], sampling=Sampling(temperature=0.0), max_tokens=50)
    return Job(request, buffer=buffer)


async def test_the_worker_counts_a_wedged_engine_but_not_a_slow_consumer() -> None:
    """``stalled_secs`` grows while a job sits in a hung engine, and stays 0 while
    the engine waits for a consumer that does not read (that is the client's
    doing, and the neuron ends it after 120 s)."""
    wedged = threading.Event()
    hung = GenerationWorker(FakeModel("hung", reply=lambda prompt: "x" * 50, wedged=wedged))
    waiting = GenerationWorker(FakeModel("waiting", reply=lambda prompt: "x" * 50))
    stuck, unread = job(), job(buffer=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hung.run)
            await nursery.start(waiting.run)
            try:
                assert hung.stalled_secs() == 0.0  # idle
                hung.submit(stuck)
                waiting.submit(unread)
                # Its first token fills the buffer; the next waits for a reader.
                await unread.admitted.wait()
                await trio.sleep(0.1)
                assert unread.delivering
                waiting.stalled_secs()
                await trio.sleep(0.3)
                assert hung.stalled_secs() >= 0.3
                assert waiting.stalled_secs() == 0.0
                wedged.set()
                assert (await collect(stuck))[0] == (await collect(unread))[0] == "x" * 50
                assert hung.stalled_secs() == waiting.stalled_secs() == 0.0
            finally:
                # A failed check must not leave threads behind for the nursery to wait on.
                wedged.set()
                for each in (stuck, unread):
                    each.close()
                hung.close(cancel=True)
                waiting.close(cancel=True)
