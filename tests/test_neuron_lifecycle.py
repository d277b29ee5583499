"""Unloading, failures and shutdown, with the fake engine where timing must be controlled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import attrs
import httpx
import pytest
import trio

from cortex.errors import InsufficientMemory
from cortex.gateway.upstream import error_from_response
from cortex.harness import Sampling, plugin_manager
from cortex.neuron.app import DRAIN_TAIL, run_neuron
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.models import LoadRequest, ModelManager
from cortex.neuron.session import Generation
from cortex.neuron.workers import (
    CANCELLED_BY_UNLOAD,
    Delta,
    Done,
    Event,
    Failed,
    GenerationRequest,
    GenerationWorker,
    Job,
)
from cortex.testing import FakeEngine, FakeModel
from tests.neuron_helpers import neuron_config, running_neuron


def fake_model(tmp_path: Path, name: str = "m.fake") -> str:
    path = tmp_path / name
    path.write_text("fake")
    return str(path)


async def test_unload_cancels_in_flight(tmp_path: Path) -> None:
    engine = FakeEngine(reply=lambda prompt: "x" * 10_000, token_delay=0.002)
    async with running_neuron([("slow", fake_model(tmp_path))], plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            body = {"model": "slow", "prompt": "go", "max_tokens": 5000, "stream": True}
            with trio.fail_after(20):
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    lines = response.aiter_lines()
                    await anext(lines)
                    unloaded = await http.post(
                        "/models/unload", json={"model_id": "slow", "cancel": True}
                    )
                    assert unloaded.json()["cancelled"] == 1
                    rest = [line async for line in lines]
    # The stream ends early and cleanly: no [DONE] after a cancelled generation.
    assert "data: [DONE]" not in rest
    assert engine.loaded[0].unloaded


async def test_unload_with_cancel_interrupts_a_prompt(tmp_path: Path) -> None:
    """Requests still on their prompt are cancelled at once, between two
    prompt chunks: the unload does not wait for their first token, and the
    clients get a 503 (nothing was streamed yet), not a token."""
    engine = FakeEngine(reply=lambda prompt: "x" * 50, prompt_delay=60, parallel=2)
    async with running_neuron([("m", fake_model(tmp_path))], plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            replies: list[httpx.Response] = []

            async def ask(path: str, body: dict[str, object]) -> None:
                replies.append(await http.post(path, json={"model": "m", "stream": True, **body}))

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask, "/v1/responses", {"input": "go"})
                    chat = {"messages": [{"role": "user", "content": "go"}]}
                    nursery.start_soon(ask, "/v1/chat/completions", chat)
                    worker = handle.neuron.manager.slots["m"].worker
                    while worker.statistics().in_flight < 2:  # noqa: ASYNC110 (state, not an event)
                        await trio.sleep(0.001)
                    unloaded = await http.post(
                        "/models/unload", json={"model_id": "m", "cancel": True}
                    )
    assert unloaded.json()["cancelled"] == 2
    for reply in replies:
        assert reply.status_code == 503, reply.text
        assert "being unloaded" in reply.json()["error"]["message"]


async def test_no_token_is_handed_out_after_a_cancel() -> None:
    """Tokens made before an unload's cancel that the client has not read yet
    are not sent after it: the stream ends with its error event at once."""
    job = Job(GenerationRequest(tokens=[1], sampling=Sampling(), max_tokens=8))
    for piece in "abc":
        job._send.send_nowait(Delta(piece))
    job._send.close()
    job.cancel()
    slot = SimpleNamespace(id="m")
    generation = Generation(slot, job, arrived=0.0, metrics=NeuronMetrics(list, list))  # type: ignore[arg-type]
    with trio.fail_after(5):
        events = [event async for event in generation.events()]
    assert events == [Failed(CANCELLED_BY_UNLOAD)]


class SlowToReturnJob(Job):
    """A job whose thread lingers once its last event is handed over: the
    window between a client having its whole answer and the worker seeing
    the job end, held open (it is a scheduling matter otherwise)."""

    def __init__(self, request: GenerationRequest) -> None:
        super().__init__(request)
        self.returns = trio.Event()

    async def deliver(self, event: Event) -> None:
        await super().deliver(event)
        if isinstance(event, Done):
            await self.returns.wait()


async def test_an_unload_does_not_count_a_job_that_already_finished() -> None:
    # A drain's unload came just after a stream ended normally: the neuron
    # logged "unloaded m (1 cancelled)" for an answer its client had whole.
    worker = GenerationWorker(FakeModel("m", reply=lambda prompt: "x" * 5, parallel=2))
    request = GenerationRequest(tokens=[1], sampling=Sampling(), max_tokens=3)
    # Its first token fills its buffer; it waits for a reader from then on.
    running = Job(attrs.evolve(request, max_tokens=5), buffer=1)
    finished = SlowToReturnJob(request)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            worker.submit(finished)
            worker.submit(running)
            events = [event async for event in _until_done(finished)]
            await running.admitted.wait()
            assert worker.statistics().in_flight == 2
            cancelled = worker.close(cancel=True)
            finished.returns.set()
            running.close()
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "length"
    assert cancelled == 1  # the one still generating, not the one that finished


async def _until_done(job: Job) -> AsyncIterator[Event]:
    async for event in job.events:
        yield event
        if isinstance(event, Done):
            return


async def test_unload_waits_for_in_flight(tmp_path: Path) -> None:
    engine = FakeEngine(reply=lambda prompt: "y" * 50, token_delay=0.002)
    async with running_neuron([("m", fake_model(tmp_path))], plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            results: dict[str, httpx.Response] = {}

            async def generate() -> None:
                results["reply"] = await http.post(
                    "/v1/completions", json={"model": "m", "prompt": "go", "max_tokens": 100}
                )

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(generate)
                    worker = handle.neuron.manager.slots["m"].worker
                    while not worker.statistics().in_flight:  # noqa: ASYNC110 (state, not an event)
                        await trio.sleep(0.001)
                    unloaded = await http.post("/models/unload", json={"model_id": "m"})
            assert unloaded.json()["cancelled"] == 0
            assert results["reply"].json()["choices"][0]["text"] == "y" * 50


async def test_failure_mid_stream_is_an_error_event(tmp_path: Path) -> None:
    engine = FakeEngine(reply=lambda prompt: "z" * 100, fail_after=5)
    async with running_neuron([("m", fake_model(tmp_path))], plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(20):
                body = {"model": "m", "prompt": "go", "max_tokens": 50, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    lines = [line async for line in response.aiter_lines() if line]
                whole = await http.post("/v1/completions", json={**body, "stream": False})
                health = await http.get("/health")
    last = json.loads(lines[-1].removeprefix("data: "))
    assert "generation failed" in last["error"]["message"]
    assert whole.status_code == 500 and "error" in whole.json()
    assert health.status_code == 200


async def test_a_draining_neuron_says_so_finishes_its_streams_and_takes_nothing_new(
    tmp_path: Path,
) -> None:
    """Shutting down, it still listens: /health says ``draining``, new work gets a 503.

    The stream it has runs to its end, well within the grace period, and the
    neuron stops as soon as nothing is left.
    """
    engine = FakeEngine(reply=lambda prompt: "x" * 200, token_delay=0.005)
    shutdown = trio.Event()
    body = {"model": "m", "prompt": "go", "max_tokens": 200, "stream": True}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                partial(
                    run_neuron, neuron_config(grace_period=20), shutdown=shutdown, plugins=[engine]
                )
            )
            await handle.neuron.manager.load(LoadRequest(model_id="m", source=fake_model(tmp_path)))
            async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
                assert (await http.get("/health")).json()["draining"] is False
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    lines = response.aiter_lines()
                    await anext(lines)
                    shutdown.set()
                    # A new connection, as a gateway's poll opens.
                    async with httpx.AsyncClient(base_url=handle.url, timeout=30) as poll:
                        health = (await poll.get("/health")).json()
                        models = await poll.get("/models")
                        refused = await poll.post("/v1/completions", json={**body, "stream": False})
                    rest = [line async for line in lines]
                drained_at = trio.current_time()
        stopped_at = trio.current_time()
    assert health["draining"] is True and health["in_flight"] == 1
    assert models.status_code == 200
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "server_error"
    assert "shutting down" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers
    # The running stream finished whole: every token, then [DONE].
    assert [line for line in rest if line][-1] == "data: [DONE]"
    text = "".join(
        json.loads(line.removeprefix("data: "))["choices"][0]["text"]
        for line in rest
        if line.startswith("data: {")
    )
    assert text == "x" * 199  # the first token came before the drain
    # Nothing left to wait for: it stopped at once, not after its 20 s.
    assert stopped_at - drained_at < 5
    assert engine.loaded[0].unloaded


async def test_an_idle_keep_alive_connection_does_not_hold_the_shutdown(tmp_path: Path) -> None:
    """A client that keeps its connection open after its answers, nothing in flight:
    the neuron stops at once: not after its 30 s grace period, nor after the
    DRAIN_TAIL it gives connections still open once drained."""
    shutdown, stopped = trio.Event(), trio.Event()

    async def neuron(*, task_status: trio.TaskStatus) -> None:
        try:
            await run_neuron(
                neuron_config(grace_period=30), shutdown=shutdown, task_status=task_status
            )
        finally:
            stopped.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(neuron)
            async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
                assert (await http.get("/health")).status_code == 200
                assert (
                    await http.post("/models/unload", json={"model_id": "m"})
                ).status_code == 404
                shutdown.set()
                shutdown_at = trio.current_time()
                await stopped.wait()
                assert trio.current_time() - shutdown_at < DRAIN_TAIL


def test_sigterm_drains_and_exits_zero(tiny_model_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cortex",
            "--role",
            "neuron",
            "--listen",
            "127.0.0.1:0",
            "--model",
            f"tiny={tiny_model_path}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, loaded = None, False
        # The server start and the model's activation run side by side: wait for both.
        for line in process.stderr:
            if "listening on" in line:
                url = line.rsplit(" ", 1)[-1].strip()
            loaded = loaded or "loaded tiny" in line
            if url and loaded:
                break
        assert url
        reply = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "Hi", "max_tokens": 3},
            timeout=30,
        )
        assert reply.status_code == 200
        # SIGHUP means "reload" to a gateway; a neuron ignores it rather than dying.
        process.send_signal(signal.SIGHUP)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "unloaded tiny" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_a_crash_leaves_its_last_words_on_stderr() -> None:
    """A segfault in an engine's native code kills the whole neuron: it must say where.

    faulthandler dumps every thread's Python stack, then the signal kills the
    process (systemd's Restart=on-failure restarts it: tests/test_contrib.py).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "cortex", "--role", "neuron", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "listening on" in line:
                break
        else:
            raise AssertionError(f"the neuron never listened (exit {process.wait()})")
        os.kill(process.pid, signal.SIGSEGV)
        assert process.wait(timeout=30) == -signal.SIGSEGV
        last_words = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert "Fatal Python error: Segmentation fault" in last_words
    assert "(most recent call first)" in last_words
    # The main thread's stack: trio's event loop, waiting for I/O.
    assert re.search(r'File ".*trio.*", line \d+ in ', last_words), last_words


def test_a_crash_during_a_load_leaves_its_last_words_too(smollm2_path: Path) -> None:
    """llama-cpp-python points stderr at /dev/null while it loads a model.

    A crash then (the load is native code too) must still reach the real
    stderr, and so must the log lines other threads write meanwhile.
    """
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "cortex", "--role", "neuron", "--listen", "127.0.0.1:0"),
            *("--model", f"m={smollm2_path}"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Caught inside the load: while fd 2 is /dev/null.
        while os.readlink(f"/proc/{process.pid}/fd/2") != "/dev/null":
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.0005)
        os.kill(process.pid, signal.SIGSEGV)
        assert process.wait(timeout=30) == -signal.SIGSEGV
        assert process.stderr is not None
        last_words = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert "loaded m" not in last_words
    assert "Fatal Python error: Segmentation fault" in last_words
    assert re.search(r'File ".*cortex_llamacpp.model\.py", line \d+ in load', last_words), (
        last_words
    )


def test_role_is_required() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "choose a role" in result.stderr


@pytest.mark.parametrize("argument", ["--model=nonsense", "--listen=host:port"])
def test_bad_arguments(argument: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "--role", "neuron", argument],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cortex: ") and ("NAME=VALUE" in last or "port must be" in last)


async def test_body_and_header_limits(tmp_path: Path) -> None:
    engine = FakeEngine()
    async with running_neuron(
        [("m", fake_model(tmp_path))], plugins=[engine], max_body_bytes=1000
    ) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(20):
                big = await http.post(
                    "/v1/completions",
                    json={"model": "m", "prompt": "x" * 2000, "max_tokens": 1},
                    headers={"x-request-id": "mine-413"},
                )
                assert big.status_code == 413
                assert big.json()["error"]["type"] == "request_too_large"
                assert big.headers["x-request-id"] == "mine-413"
                huge_header = await http.get("/health", headers={"x-junk": "y" * 300_000})
                assert huge_header.status_code in (400, 431)
                small = await http.post(
                    "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}
                )
                assert small.status_code == 200
                assert small.headers["x-request-id"]
                echoed = await http.get("/health", headers={"x-request-id": "abc-123"})
                assert echoed.headers["x-request-id"] == "abc-123"


async def test_unload_waits_for_a_request_still_tokenizing(tmp_path: Path) -> None:
    engine = FakeEngine(reply=lambda prompt: "done", tokenize_delay=0.3)
    async with running_neuron([("m", fake_model(tmp_path))], plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            results: dict[str, httpx.Response] = {}

            async def generate() -> None:
                results["reply"] = await http.post(
                    "/v1/completions", json={"model": "m", "prompt": "go", "max_tokens": 10}
                )

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(generate)
                    slot = handle.neuron.manager.slots["m"]
                    while not slot.users:  # noqa: ASYNC110 (state, not an event)
                        await trio.sleep(0.001)
                    unloaded = await http.post("/models/unload", json={"model_id": "m"})
    # The unload waited for the tokenizing request, which then ran to its end
    # on a model that was still there.
    assert unloaded.status_code == 200
    assert results["reply"].status_code == 200
    assert results["reply"].json()["choices"][0]["text"] == "done"
    assert engine.loaded[0].unloaded


async def test_load_during_an_unload_loads_again(tmp_path: Path) -> None:
    engine = FakeEngine(reply=lambda prompt: "z" * 30, token_delay=0.005)
    source = fake_model(tmp_path)
    async with running_neuron([("m", source)], plugins=[engine]) as handle:
        manager = handle.neuron.manager
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            http.post,
                            "/v1/completions",
                            json={"model": "m", "prompt": "go", "max_tokens": 30},
                        )
                    )
                    while not manager.slots["m"].worker.statistics().in_flight:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    nursery.start_soon(partial(manager.unload, "m", cancel=False))
                    while not manager.slots["m"].unloading:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    reloaded = await manager.load(LoadRequest(model_id="m", source=source))
                assert manager.slots["m"] is reloaded
                assert reloaded.status == "loaded" and not reloaded.unloading
                reply = await http.post(
                    "/v1/completions", json={"model": "m", "prompt": "go", "max_tokens": 3}
                )
                assert reply.status_code == 200
    assert len(engine.loaded) == 2 and engine.loaded[0].unloaded


async def test_a_load_reads_shared_state_in_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slots dict and device samples change in the trio thread; a load
    # thread iterating them could see "dictionary changed size during iteration".
    threads: list[bool] = []
    memory_used_mb = ModelManager.memory_used_mb

    def recording(self: ModelManager) -> int:
        threads.append(threading.current_thread() is threading.main_thread())
        return memory_used_mb(self)

    def free_mb() -> dict[int, int]:
        threads.append(threading.current_thread() is threading.main_thread())
        return {}

    monkeypatch.setattr(ModelManager, "memory_used_mb", recording)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager = ModelManager(
                plugin_manager(plugins=[FakeEngine()]),
                nursery,
                memory_budget_mb=1024,
                n_ctx_max=2048,
                queue_limit=4,
                device_free_mb=free_mb,
            )
            await manager.load(LoadRequest(model_id="m", source=fake_model(tmp_path)))
            await manager.unload_all()
    assert threads and all(threads)


async def test_a_load_refused_for_want_of_memory_says_how_much_it_needs(tmp_path: Path) -> None:
    big = tmp_path / "big.fake"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    async with running_neuron(
        [("small", fake_model(tmp_path))], plugins=[FakeEngine()], memory_budget_mb=3
    ) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(10):
                refused = await http.post(
                    "/models/load", json={"model_id": "big", "source": str(big)}
                )
    # Not a 500: the neuron is fine, others hold the room (the fake takes 1 MiB).
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["type"] == "server_error"
    assert "needs at least 3 MiB, 2 MiB of the 3 MiB budget is free" in error["message"]
    # What a gateway reads back: the MiB needed.
    back = error_from_response(refused.status_code, refused.content, refused.headers)
    assert isinstance(back, InsufficientMemory) and back.need_mb == 3


async def test_a_first_refusal_says_all_the_load_needs(gemma3_path: Path) -> None:
    """Refused where even the file does not fit, the figure is the engine's whole estimate.

    The weights, the KV cells for n_ctx x parallel and the host tier: a
    budget of that many MiB loads it, so a gateway that unloads others to
    make that much room does not evict for nothing (the file's size alone
    said 241 MiB for Gemma 3 270M, and the engine then wanted 322).
    """
    pytest.importorskip("cortex_llamacpp")
    load = {
        "model_id": "gemma",
        "source": "demo:gemma3",
        "options": {"n_ctx": 2048, "parallel": 2, "n_threads": 1},
    }
    file_mb = (await trio.Path(gemma3_path).stat()).st_size // 2**20
    async with running_neuron(memory_budget_mb=file_mb // 4) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(30):
                refused = await http.post("/models/load", json=load)
    assert refused.status_code == 503, refused.text
    back = error_from_response(refused.status_code, refused.content, refused.headers)
    assert isinstance(back, InsufficientMemory) and back.need_mb is not None
    assert back.need_mb > file_mb
    assert f"needs at least {back.need_mb} MiB" in back.message
    # The least that loads it.
    async with running_neuron(memory_budget_mb=back.need_mb) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=60) as http:
            with trio.fail_after(60):
                loaded = await http.post("/models/load", json=load)
    assert loaded.status_code == 200, loaded.text


async def test_a_load_the_engines_plan_refuses_says_how_much_it_needs(
    tiny_model_factory,
) -> None:
    """The file fits the budget, the least context beside it does not: the engine refuses.

    llama.cpp's context plan, not the neuron's file-size check: the same 503
    ``insufficient_memory``, with the weights and 256 KV cells as the figure.
    """
    pytest.importorskip("cortex_llamacpp")
    # 8 layers x 256 x 4 bytes: 8 KiB of KV a token, 2 MiB for the least 256 cells.
    path = tiny_model_factory("wide.gguf", n_layer=8, n_embd=256)
    size = path.stat().st_size
    need_mb = -(-(size + 256 * 8192) // 2**20)
    budget_mb = -(-size // 2**20)
    assert budget_mb < need_mb
    async with running_neuron(memory_budget_mb=budget_mb) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(30):
                refused = await http.post(
                    "/models/load",
                    json={
                        "model_id": "wide",
                        "source": str(path),
                        "options": {"parallel": 1, "n_threads": 1},
                    },
                )
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert f"needs at least {need_mb} MiB" in error["message"]
    assert str(path.parent) not in error["message"]
    back = error_from_response(refused.status_code, refused.content, refused.headers)
    assert isinstance(back, InsufficientMemory) and back.need_mb == need_mb
