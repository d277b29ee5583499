"""The gateway in front of real neurons with a tiny GGUF model (llama.cpp)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anthropic
import attrs
import httpx
import openai
import pytest
import trio

from cortex import status as status_command
from cortex.config import (
    CatalogModel,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
)
from cortex.gateway.app import GatewayHandle, run_gateway
from cortex.neuron.app import run_neuron
from cortex.neuron.models import LoadRequest
from cortex.testing import FakeEngine

pytest.importorskip("cortex_llamacpp")

from tests.neuron_helpers import neuron_config, running_neuron


async def test_cold_load_and_both_sdks_against_a_real_neuron(tiny_model_path) -> None:
    models = ModelsFile(
        models=[
            CatalogModel(
                id="t/tiny",
                source=str(tiny_model_path),
                vram_mb=50,
                options={"n_threads": 1},
                sampling={"temperature": 0.0},
            )
        ],
        aliases={"tiny": "t/tiny"},
    )
    with trio.fail_after(60):
        async with running_neuron(memory_budget_mb=2000) as neuron:
            config = GatewayConfig(
                gateway=GatewaySection(
                    listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1.0
                ),
                neurons=[NeuronEndpoint("n1", neuron.url)],
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
                try:
                    async with openai.AsyncOpenAI(
                        base_url=gw.api_url + "/v1", api_key="x", max_retries=0
                    ) as client:
                        chat = await client.chat.completions.create(
                            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
                        )
                        assert chat.model == "t/tiny"
                        assert chat.usage is not None and chat.usage.completion_tokens == 8
                        stream = await client.chat.completions.create(
                            model="tiny",
                            messages=[{"role": "user", "content": "hi"}],
                            max_tokens=8,
                            stream=True,
                        )
                        text = "".join(
                            [c.choices[0].delta.content or "" async for c in stream if c.choices]
                        )
                        assert text == chat.choices[0].message.content  # greedy
                    async with anthropic.AsyncAnthropic(
                        base_url=gw.api_url, api_key="x", max_retries=0
                    ) as client:
                        async with client.messages.stream(
                            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                        ) as events:
                            final = await events.get_final_message()
                        assert final.stop_reason == "max_tokens"
                        # The same prompt a third time: all but its last token is cached,
                        # and Anthropic's input_tokens counts only the rest.
                        usage = final.usage
                        assert usage.cache_read_input_tokens == chat.usage.prompt_tokens - 1
                        assert usage.input_tokens == 1
                        assert usage.cache_creation_input_tokens == 0
                        count = await client.messages.count_tokens(
                            model="tiny", messages=[{"role": "user", "content": "hi"}]
                        )
                        assert count.input_tokens == chat.usage.prompt_tokens
                    async with httpx.AsyncClient() as http:
                        metrics = (await http.get(gw.metrics_url + "/metrics")).text
                    assert 'cortex_cold_starts_total{model="t/tiny",neuron="n1"} 1.0' in metrics
                finally:
                    shutdown.set()


@attrs.define(eq=False)
class NeuronProcess:
    """A neuron's process and everything it has written to stderr so far."""

    process: trio.Process
    url: str = ""
    stderr: str = ""
    #: Its stderr reached end of file: it has exited, or is exiting.
    closed: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk.decode(errors="replace")
            self._changed.set()
            self._changed = trio.Event()
        self.closed = True
        self._changed.set()

    async def said(self, text: str) -> None:
        while text not in self.stderr:
            if self.closed:
                raise AssertionError(f"the neuron closed its stderr:\n{self.stderr}")
            await self._changed.wait()


@asynccontextmanager
async def neuron_process(model_id: str, source: Path) -> AsyncIterator[NeuronProcess]:
    """``cortex --role neuron`` in a process of its own, on a free loopback port."""
    command = [
        sys.executable,
        *("-m", "cortex", "--role", "neuron", "--listen", "127.0.0.1:0"),
        *("--model", f"{model_id}={source}"),
    ]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    neuron = NeuronProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(neuron.read_stderr)
            # The server and the model's activation start side by side.
            await neuron.said("listening on")
            await neuron.said(f"loaded {model_id}")
            neuron.url = neuron.stderr.split("listening on ", 1)[1].split()[0]
            yield neuron
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_a_neuron_that_dies_is_marked_down_and_its_models_served_elsewhere(
    tiny_model_path: Path,
) -> None:
    """A neuron process killed by a segfault, what a crash in its engine does to it.

    The request that next picks it cannot connect: the gateway marks it
    suspect, loads the model on the other neuron and answers from there;
    the poller then marks it down. (The fake-neuron version, a neuron that
    shuts down cleanly, is ``test_requests_move_off_a_neuron_that_went_down``
    in test_gateway_routing.py.)
    """
    models = ModelsFile(
        models=[
            CatalogModel(
                id="small",
                source=str(tiny_model_path),
                vram_mb=50,
                options={"n_threads": 1},
                sampling={"temperature": 0.0},
            )
        ]
    )
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with trio.fail_after(120):
        async with (
            neuron_process("small", tiny_model_path) as doomed,
            # Empty: the loaded replica on the doomed one is the router's choice.
            running_neuron(memory_budget_mb=2000) as survivor,
        ):
            config = GatewayConfig(
                gateway=GatewaySection(
                    listen="127.0.0.1:0",
                    metrics_listen="127.0.0.1:0",
                    grace_period=1.0,
                    # Only the failed request can tell it: it pokes the poller.
                    poll_interval=3600.0,
                ),
                neurons=[NeuronEndpoint("doomed", doomed.url), NeuronEndpoint("a", survivor.url)],
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
                state = gw.state
                try:
                    async with httpx.AsyncClient(base_url=gw.api_url, timeout=30) as http:
                        await state.wait_polled()
                        reply = await http.post("/v1/chat/completions", json=body)
                        assert reply.status_code == 200, reply.text
                        assert "small" not in survivor.neuron.manager.slots
                        fleet = (await http.get("/fleet")).json()
                        assert {n["name"]: n["up"] for n in fleet["neurons"]} == {
                            "doomed": True,
                            "a": True,
                        }

                        os.kill(doomed.process.pid, signal.SIGSEGV)
                        assert await doomed.process.wait() == -signal.SIGSEGV
                        await doomed.said("Fatal Python error: Segmentation fault")

                        # The gateway has not noticed: it still routes to the dead one.
                        assert state.neurons["doomed"].routable
                        reply = await http.post("/v1/chat/completions", json=body)
                        assert reply.status_code == 200, reply.text
                        assert not state.neurons["doomed"].routable
                        worker = survivor.neuron.manager.slots["small"].worker
                        assert worker.statistics().tokens_generated == 4

                        while state.neurons["doomed"].up:
                            await state.wait_changed()
                        fleet = (await http.get("/fleet")).json()
                        assert {n["name"]: n["up"] for n in fleet["neurons"]} == {
                            "doomed": False,
                            "a": True,
                        }
                        health = (await http.get("/health")).json()
                        assert health["status"] == "degraded"
                        listed = (await http.get("/v1/models/small")).json()
                        assert [where["neuron"] for where in listed["locations"]] == ["a"]
                        reply = await http.post("/v1/chat/completions", json=body)
                        assert reply.status_code == 200, reply.text
                        assert worker.statistics().tokens_generated == 8
                finally:
                    shutdown.set()


@asynccontextmanager
async def gateway_over(
    models: ModelsFile, **neurons: str
) -> AsyncIterator[tuple[GatewayHandle, httpx.AsyncClient]]:
    """A gateway on port 0 over ``neurons`` (name -> URL), and a client of it."""
    config = GatewayConfig(
        gateway=GatewaySection(
            listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1.0
        ),
        neurons=[NeuronEndpoint(name, url) for name, url in neurons.items()],
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
        try:
            async with httpx.AsyncClient(base_url=gw.api_url, timeout=30) as http:
                await gw.state.wait_polled()
                yield gw, http
        finally:
            shutdown.set()


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_a_model_without_vram_mb_gets_room_once_the_neuron_says_what_it_needs(
    tmp_path: Path,
) -> None:
    """No ``vram_mb``: planned at 0 MiB, no eviction; the neuron refuses with what it needs.

    The gateway learns that figure and plans again: it evicts the idle model
    that holds the memory and loads, and the request succeeds.
    """
    idle = tmp_path / "idle.fake"
    idle.write_text("fake")
    big = tmp_path / "big.fake"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    models = ModelsFile(
        models=[
            CatalogModel(id="idle", source=str(idle), vram_mb=1),
            CatalogModel(id="novram", source=str(big)),
        ]
    )
    with trio.fail_after(30):
        # The fake engine's models take 1 MiB: "idle" leaves 2 of the 3 free.
        async with (
            running_neuron(plugins=[FakeEngine()], memory_budget_mb=3) as neuron,
            gateway_over(models, a=neuron.url) as (gw, http),
        ):
            reply = await http.post("/v1/chat/completions", json=chat("idle"))
            assert reply.status_code == 200, reply.text
            reply = await http.post("/v1/chat/completions", json=chat("novram"))
            assert reply.status_code == 200, reply.text
            assert set(neuron.neuron.manager.slots) == {"novram"}
            entry = gw.state.entry("novram")
            assert entry is not None and entry.vram_mb == 3


async def test_a_model_the_engines_plan_refuses_gets_room_after_an_eviction(
    tiny_model_factory,
) -> None:
    """The neuron's file-size check passes, llama.cpp's context plan refuses: still a replan.

    The engine says how much the weights and its least context need; the
    gateway evicts the idle model that holds the room and the request succeeds.
    """
    # 8 layers x 256 x 4 bytes: 8 KiB of KV a token. Each file is 11.6 MiB;
    # "idle" loads with its 512 tokens in 16 MiB, which leaves 12 of the 28:
    # room for the file of "wide" (11), not for it and 256 cells (14).
    idle = tiny_model_factory("idle.gguf", n_layer=8, n_embd=256)
    wide = tiny_model_factory("wide.gguf", n_layer=8, n_embd=256, seed=1)
    options = {"parallel": 1, "n_threads": 1}
    models = ModelsFile(
        models=[
            CatalogModel(id="idle", source=str(idle), vram_mb=16, options=options),
            CatalogModel(id="wide", source=str(wide), vram_mb=11, options=options),
        ]
    )
    with trio.fail_after(60):
        async with (
            running_neuron(memory_budget_mb=28) as neuron,
            gateway_over(models, a=neuron.url) as (gw, http),
        ):
            reply = await http.post("/v1/chat/completions", json=chat("idle"))
            assert reply.status_code == 200, reply.text
            assert neuron.neuron.manager.slots["idle"].memory_mb == 16
            reply = await http.post("/v1/chat/completions", json=chat("wide"))
            assert reply.status_code == 200, reply.text
            assert set(neuron.neuron.manager.slots) == {"wide"}
            entry = gw.state.entry("wide")
            need_mb = -(-(wide.stat().st_size + 256 * 8192) // 2**20)
            assert entry is not None and entry.vram_mb == need_mb == 14


async def test_a_draining_neuron_gets_nothing_new_and_finishes_its_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A neuron shutting down says ``draining`` in its health polls.

    The gateway shows it as draining (its /health, ``cortex status``), sends
    a new request for its model to the other neuron (loading it there), and
    the stream already running on it finishes whole.
    """
    source = tmp_path / "m.fake"
    source.write_text("fake")
    models = ModelsFile(models=[CatalogModel(id="m", source=str(source), vram_mb=1)])
    slow = FakeEngine(reply=lambda prompt: "x" * 200, token_delay=0.01)
    other = FakeEngine()
    shutdown = trio.Event()
    body = {"model": "m", "prompt": "go", "max_tokens": 200, "stream": True}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a = await nursery.start(
                partial(
                    run_neuron, neuron_config(grace_period=20), shutdown=shutdown, plugins=[slow]
                )
            )
            await a.neuron.manager.load(LoadRequest(model_id="m", source=str(source)))
            async with (
                running_neuron(plugins=[other]) as b,
                gateway_over(models, a=a.url, b=b.url) as (gw, http),
            ):
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    lines = response.aiter_lines()
                    await anext(lines)
                    shutdown.set()
                    draining = gw.state.neurons["a"]
                    while not draining.draining:
                        draining.poke.set()
                        await gw.state.wait_changed()
                    health = (await http.get("/health")).json()
                    fleet = (await http.get("/fleet")).json()
                    reply = await http.post("/v1/completions", json={**body, "stream": False})
                    rest = [line async for line in lines]
                assert reply.status_code == 200, reply.text
                assert set(b.neuron.manager.slots) == {"m"}
                # Routed to b from the start: not sent to a, refused, and retried.
                assert "trying the next route" not in caplog.text
                assert len(slow.loaded) == 1 and len(other.loaded) == 1
    assert health["status"] == "degraded"
    assert {n["name"]: n["draining"] for n in health["neurons"]} == {"a": True, "b": False}
    assert next(n for n in health["neurons"] if n["name"] == "a")["up"] is True
    row = next(line for line in status_command.render(fleet).splitlines() if line.startswith("a "))
    assert row.split()[1] == "draining"
    assert [line for line in rest if line][-1] == "data: [DONE]"
    text = "".join(
        json.loads(line.removeprefix("data: "))["choices"][0]["text"]
        for line in rest
        if line.startswith("data: {")
    )
    assert text == "x" * 199  # the first token came before the drain


async def test_a_catalogue_entry_the_neuron_refuses_is_the_operators_error(
    tiny_model_path: Path,
) -> None:
    """A typo in the catalogue's ``options``: a 500 naming the entry, not a 400 on the client."""
    models = ModelsFile(
        models=[
            CatalogModel(
                id="badopt", source=str(tiny_model_path), vram_mb=50, options={"n_ctxx": 2048}
            )
        ]
    )
    with trio.fail_after(30):
        async with (
            running_neuron(memory_budget_mb=2000) as neuron,
            gateway_over(models, a=neuron.url) as (_, http),
        ):
            reply = await http.post("/v1/chat/completions", json=chat("badopt"))
            assert reply.status_code == 500, reply.text
            error = reply.json()["error"]
            assert error["type"] == "server_error" and error["param"] is None
            assert error["code"] == "invalid_catalogue_entry"
            assert error["message"].startswith("the catalogue entry for 'badopt' is invalid: ")
            assert "n_ctxx" in error["message"]
            reply = await http.post(
                "/v1/messages",
                json={"model": "badopt", "max_tokens": 4, "messages": chat("x")["messages"]},
            )
            assert reply.status_code == 500, reply.text
            assert reply.json()["error"]["type"] == "api_error"


async def test_another_gateways_failed_load_is_not_advertised_nor_pinned(
    tiny_model_path: Path,
) -> None:
    """The neuron keeps a record of a load that failed; a second gateway lists nothing of it."""
    bad = CatalogModel(id="badopt", source=str(tiny_model_path), options={"n_ctxx": 2048})
    with trio.fail_after(30):
        async with (
            running_neuron(memory_budget_mb=2000) as neuron,
            gateway_over(ModelsFile(models=[bad]), a=neuron.url) as (_, first),
        ):
            reply = await first.post("/v1/chat/completions", json=chat("badopt"))
            assert reply.status_code == 500, reply.text
            async with gateway_over(ModelsFile(), a=neuron.url) as (gw, second):
                assert gw.state.neurons["a"].status_of("badopt") == "failed"
                listed = (await second.get("/v1/models")).json()["data"]
                assert "badopt" not in [m["id"] for m in listed]
                reply = await second.get("/v1/models/badopt")
                assert reply.status_code == 404, reply.text
                fleet = (await second.get("/fleet")).json()
                assert "badopt" not in [m["id"] for m in fleet["models"]]
                assert "badopt" not in status_command.render(fleet)


async def test_a_load_refused_for_want_of_memory_leaves_no_failed_record(
    tmp_path: Path,
) -> None:
    """A neuron short of room refused the model: nothing failed, it is servable elsewhere.

    The neuron keeps no record of the refusal, so neither ``/v1/models`` nor
    ``/fleet`` (``cortex status``) shows it failed, before or after it loads
    on the other neuron.
    """
    big = tmp_path / "big.fake"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    models = ModelsFile(models=[CatalogModel(id="m", source=str(big))])
    with trio.fail_after(30):
        async with (
            running_neuron(plugins=[FakeEngine()], memory_budget_mb=2) as short,
            running_neuron(plugins=[FakeEngine()], memory_budget_mb=100) as roomy,
        ):
            async with httpx.AsyncClient(base_url=short.url, timeout=30) as direct:
                refused = await direct.post(
                    "/models/load", json={"model_id": "m", "source": str(big)}
                )
                assert refused.status_code == 503, refused.text
                assert (await direct.get("/models")).json() == []
            async with gateway_over(models, a=short.url, b=roomy.url) as (_, http):
                listed = (await http.get("/v1/models/m")).json()
                assert listed["status"] == "available" and listed["locations"] == []
                reply = await http.post("/v1/chat/completions", json=chat("m"))
                assert reply.status_code == 200, reply.text
                listed = (await http.get("/v1/models/m")).json()
                assert listed["status"] == "loaded"
                assert listed["locations"] == [{"neuron": "b", "status": "loaded"}]
                fleet = (await http.get("/fleet")).json()
                (model,) = [m for m in fleet["models"] if m["id"] == "m"]
                assert [loc["neuron"] for loc in model["locations"]] == ["b"]
                assert "failed" not in status_command.render(fleet)


async def test_a_model_the_neuron_loaded_at_its_start_is_never_evicted(
    tiny_model_path: Path,
) -> None:
    """Not in the gateway's catalogue: it could not be loaded back, so it stays, as if pinned."""
    async with running_neuron([("keepme", str(tiny_model_path))], memory_budget_mb=2000) as neuron:
        manager = neuron.neuron.manager
        free = manager.memory_budget_mb - manager.memory_used_mb()
        # Fits only where "keepme" is.
        models = ModelsFile(
            models=[
                CatalogModel(
                    id="other",
                    source=str(tiny_model_path),
                    vram_mb=free + 1,
                    options={"n_ctx": 256},
                )
            ]
        )
        with trio.fail_after(30):
            async with gateway_over(models, a=neuron.url) as (_, http):
                reply = await http.post("/v1/chat/completions", json=chat("other"))
                assert reply.status_code == 503, reply.text
                assert (
                    "not this gateway's to load back: 'keepme'" in reply.json()["error"]["message"]
                )
                reply = await http.post("/v1/chat/completions", json=chat("keepme"))
                assert reply.status_code == 200, reply.text
                assert set(manager.slots) == {"keepme"}


async def test_top_p_0_keeps_the_most_likely_token_on_every_route(tiny_model_path) -> None:
    """``top_p: 0`` with ``temperature: 1`` is greedy whatever the seed (OpenAI: [0, 1])."""
    models = ModelsFile(
        models=[CatalogModel(id="t/tiny", source=str(tiny_model_path), vram_mb=50)],
        aliases={"tiny": "t/tiny"},
    )
    hi = [{"role": "user", "content": "hi"}]
    with trio.fail_after(60):
        async with (
            running_neuron([("t/tiny", str(tiny_model_path))]) as neuron,
            gateway_over(models, n1=neuron.url) as (gw, http),
            openai.AsyncOpenAI(base_url=gw.api_url + "/v1", api_key="x", max_retries=0) as client,
            anthropic.AsyncAnthropic(base_url=gw.api_url, api_key="x", max_retries=0) as claude,
        ):
            greedy = await client.chat.completions.create(
                model="tiny", messages=hi, max_tokens=12, temperature=0
            )
            sampled = {
                (
                    await client.chat.completions.create(
                        model="tiny", messages=hi, max_tokens=12, temperature=1, seed=seed
                    )
                )
                .choices[0]
                .message.content
                for seed in range(4)
            }
            assert len(sampled) > 1  # else the check below would prove nothing
            chats, prompts, answers = set(), set(), set()
            for seed in range(4):
                reply = await client.chat.completions.create(
                    model="tiny", messages=hi, max_tokens=12, temperature=1, top_p=0, seed=seed
                )
                chats.add(reply.choices[0].message.content)
                text = await client.completions.create(
                    model="tiny", prompt="Once", max_tokens=12, temperature=1, top_p=0, seed=seed
                )
                prompts.add(text.choices[0].text)
                response = await client.responses.create(
                    model="tiny",
                    input=hi,
                    max_output_tokens=12,
                    temperature=1,
                    top_p=0,
                    extra_body={"seed": seed},
                )
                answers.add(response.output_text)
            assert chats == answers == {greedy.choices[0].message.content}
            assert len(prompts) == 1
            message = await claude.messages.create(
                model="tiny", max_tokens=12, messages=hi, extra_body={"temperature": 1, "top_p": 0}
            )
            assert message.content[0].text == greedy.choices[0].message.content
            for path, body in [
                ("/v1/chat/completions", {"messages": hi}),
                ("/v1/messages", {"messages": hi, "max_tokens": 4}),
            ]:
                refused = await http.post(path, json={"model": "tiny", "top_p": -1, **body})
                assert refused.status_code == 400
                assert "top_p must be in [0, 1], got -1" in refused.text
