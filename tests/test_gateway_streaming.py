"""Streaming passthrough, faults before and after the first byte, metrics."""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from cortex.config import CatalogModel
from cortex.errors import CortexError
from cortex.fleet import make_converter
from cortex.gateway.app import run_gateway
from cortex.gateway.poller import refresh
from cortex.gateway.upstream import NeuronAPI
from cortex.wire.sse import SSEDecoder
from tests.gateway_helpers import (
    FakeNeuron,
    GatewayApp,
    _config,
    catalogue,
    gateway_app,
    running_fleet,
    start_fake,
)

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
STREAM = {
    "model": "org/small",
    "messages": [{"role": "user", "content": "say hello"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
STREAM_PATH = "/v1/chat/completions"
MESSAGES_STREAM = {
    "model": "org/small",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "say hello"}],
    "stream": True,
}


def favoured(fake: FakeNeuron) -> FakeNeuron:
    """Make ``fake`` the most recently used holder of org/small: it is tried first."""
    fake.loaded["org/small"]["last_used"] = time.time() + 1000
    return fake


async def test_stream_passes_through_byte_for_byte() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            async with fleet.client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                received = b"".join([chunk async for chunk in r.aiter_raw()])
            assert received == a.sent[-1]
            assert received.endswith(b"data: [DONE]\n\n")


async def test_chunks_arrive_before_the_stream_ends() -> None:
    # The neuron sends two chunks and then stalls: the client must have both
    # long before the idle timeout ends the stream with an error event.
    a = FakeNeuron("a", preload=["org/small"], fault="hang_mid_stream")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, idle_timeout=1.0) as fleet:
            async with fleet.client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                decoder, events = SSEDecoder(), []
                started = trio.current_time()
                async for chunk in r.aiter_raw():
                    events += decoder.feed(chunk)
                    if len(events) == 2:
                        assert trio.current_time() - started < 0.9
                last = json.loads(events[-1].data)
            assert len(events) == 3
            assert "sent nothing for 1 s" in last["error"]["message"]
            assert last["error"]["type"] == "server_error"
            # The gateway is still serving.
            a.fault = None
            assert (await fleet.chat("org/small")).status_code == 200


async def test_death_before_first_byte_retries_on_the_next_neuron() -> None:
    a = favoured(FakeNeuron("a", preload=["org/small"], fault="die_before_first_byte"))
    b = FakeNeuron("b", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS) as fleet:
            async with fleet.client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                assert r.status_code == 200
                received = b"".join([chunk async for chunk in r.aiter_raw()])
            assert received == b.sent[-1]
            assert len(a.requests) == 1
            # Non-streaming as well (a is suspect now; make it look healthy again).
            favoured(a)
            await fleet.refresh()
            assert not fleet.state.neurons["a"].suspect
            # Another conversation: the first one's prefix is at b now (affinity).
            response = await fleet.chat("org/small", "a new conversation")
            assert response.status_code == 200
            assert len(a.requests) == 2 and len(b.requests) == 2


async def test_death_mid_stream_ends_with_an_error_event() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_mid_stream")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            async with fleet.client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                assert r.status_code == 200
                received = b"".join([chunk async for chunk in r.aiter_raw()])
            events = SSEDecoder().feed(received)
            assert len(events) == 3
            assert received.startswith(a.sent[-1])
            error = json.loads(events[-1].data)["error"]
            assert error["type"] == "server_error" and "mid-stream" in error["message"]
            a.fault = None
            assert (await fleet.chat("org/small")).status_code == 200
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert (
                'cortex_request_errors_total{endpoint="chat/completions",model="org/small",'
                'status="502"} 1.0' in metrics
            )


async def test_hang_before_first_byte_times_out() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="hang_before_first_byte")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, first_byte_timeout=0.5) as fleet:
            response = await fleet.client.post("/v1/chat/completions", json=STREAM)
            assert response.status_code == 504
            assert response.json()["error"]["type"] == "server_error"
            response = await fleet.chat("org/small")
            assert response.status_code == 504
            a.fault = None
            assert (await fleet.chat("org/small")).status_code == 200


async def inference_requests(fake: FakeNeuron, count: int) -> None:
    """Wait until ``fake`` has received ``count`` inference requests."""
    while sum(path != "/tokenize" for path, _, _ in fake.requests) < count:
        await fake.request_arrived.wait()
        fake.request_arrived = trio.Event()


async def mark_down_by_a_poll(fleet, name: str) -> float:
    """Poll neuron ``name`` as its poller does, with a short timeout; when it was marked down."""
    async with httpx.AsyncClient() as client:
        api = NeuronAPI(
            client=client,
            converter=make_converter(),
            call_timeout=httpx.Timeout(0.3),
            load_timeout=httpx.Timeout(0.3),
        )
        with pytest.raises(CortexError, match="did not answer in time"):
            await refresh(api, fleet.state, fleet.state.neurons[name])
    assert not fleet.state.neurons[name].up
    return trio.current_time()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_request_waiting_on_a_neuron_marked_down_moves_on_at_once(stream: bool) -> None:
    # a takes the request, then freezes (SIGSTOP) before its first byte: once
    # a poll marks it down, the request moves to b, long before first_byte_timeout.
    a = favoured(FakeNeuron("a", preload=["org/small"], hold=trio.Event()))
    b = FakeNeuron("b", preload=["org/small"])
    answers: list[tuple[float, bytes]] = []

    async def ask(fleet) -> None:
        response = await fleet.client.post(
            "/v1/chat/completions", json={**STREAM, "stream": stream}
        )
        assert response.status_code == 200, response.text
        answers.append((trio.current_time(), response.content))

    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS, first_byte_timeout=60.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, fleet)
                await a.request_arrived.wait()
                a.frozen = True
                down_at = await mark_down_by_a_poll(fleet, "a")
            [(answered_at, content)] = answers
            assert answered_at - down_at < 1.0
            assert content == b.sent[-1] and len(b.requests) == 1
            a.thaw.set()
            a.hold.set()


async def test_with_no_other_route_a_neuron_marked_down_is_a_503_at_once() -> None:
    a = FakeNeuron("a", preload=["org/small"], hold=trio.Event(), parallel=2)
    answers: list[tuple[float, httpx.Response]] = []

    async def ask(fleet, path: str, body: dict) -> None:
        answers.append((trio.current_time(), await fleet.client.post(path, json=body)))

    with trio.fail_after(10):
        async with running_fleet([a], MODELS, first_byte_timeout=60.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, fleet, STREAM_PATH, STREAM)
                nursery.start_soon(ask, fleet, "/v1/messages", MESSAGES_STREAM)
                await inference_requests(a, 2)
                a.frozen = True
                down_at = await mark_down_by_a_poll(fleet, "a")
            for answered_at, response in answers:
                assert answered_at - down_at < 1.0
                assert response.status_code in (503, 529), response.text
                assert "neuron a went down before it answered" in response.text
            a.thaw.set()
            a.hold.set()


async def test_neuron_error_chunk_passes_through() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="error_chunk")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post("/v1/chat/completions", json=STREAM)
            assert response.content == a.sent[-1]
            assert b"generation failed" in response.content


async def test_client_going_away_closes_the_neuron_stream() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="hang_mid_stream")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            async with fleet.client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                async for _ in r.aiter_raw():
                    break
            # The fake's generator ends (its finally runs) once the gateway
            # closes the upstream connection.
            while a.in_flight.get("org/small"):
                await a._changed.wait()
            neuron = fleet.state.neurons["a"]
            while neuron.in_flight.get("org/small"):
                await fleet.state.wait_changed()
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert (
                'cortex_request_errors_total{endpoint="chat/completions",model="org/small",'
                'status="499"} 1.0' in metrics
            )


async def test_client_going_away_before_the_answer_closes_the_neuron_request() -> None:
    a = FakeNeuron("a", preload=["org/small"], hold=trio.Event())
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            body = {"model": "org/small", "messages": [{"role": "user", "content": "hi"}]}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(fleet.client.post, "/v1/chat/completions", json=body))
                await a.request_arrived.wait()
                nursery.cancel_scope.cancel()
            while a.in_flight.get("org/small"):
                await a._changed.wait()
            neuron = fleet.state.neurons["a"]
            while neuron.in_flight.get("org/small"):
                await fleet.state.wait_changed()
            metrics = await fleet.client.get(fleet.handle.metrics_url + "/metrics")
            assert 'cortex_request_errors_total{endpoint="chat/completions"' in metrics.text
            assert 'status="499"' in metrics.text
            # Counted against the neuron that was working on it.
            assert (
                'cortex_requests_total{endpoint="chat/completions",model="org/small",neuron="a"}'
                in metrics.text
            )


async def test_completions_and_responses_pass_through() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            for path, body in [
                ("/v1/completions", {"model": "org/small", "prompt": "once upon"}),
                ("/v1/responses", {"model": "org/small", "input": "hello"}),
            ]:
                response = await fleet.client.post(path, json=body)
                assert response.status_code == 200, response.text
                assert response.content == a.sent[-1]
                response = await fleet.client.post(path, json={**body, "stream": True})
                assert response.status_code == 200
                assert response.content == a.sent[-1]
                assert a.requests[-1][0] == path


async def test_metrics_after_traffic() -> None:
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            assert (await fleet.chat("org/small")).status_code == 200
            response = await fleet.client.post("/v1/chat/completions", json=STREAM)
            assert response.status_code == 200
            await fleet.client.post("/v1/responses", json={"model": "org/small", "input": "x"})
            assert (await fleet.chat("no/such")).status_code == 404
            scrape = await fleet.client.get(fleet.handle.metrics_url + "/metrics")
            assert scrape.status_code == 200
            text = scrape.text
            expected = [
                'cortex_requests_total{endpoint="chat/completions",model="org/small",'
                'neuron="a"} 2.0',
                'cortex_requests_total{endpoint="responses",model="org/small",neuron="a"} 1.0',
                'cortex_request_errors_total{endpoint="chat/completions",model="unknown",'
                'status="404"} 1.0',
                'cortex_request_duration_seconds_count{endpoint="chat/completions",'
                'model="org/small"} 2.0',
                'cortex_time_to_first_token_seconds_count{endpoint="chat/completions",'
                'model="org/small",neuron="a"} 1.0',
                # 2 words of prompt per chat, 1 word in the responses input.
                'cortex_tokens_total{kind="prompt",model="org/small",neuron="a"} 7.0',
                'cortex_tokens_total{kind="completion",model="org/small",neuron="a"} 15.0',
                'cortex_tokens_per_second_count{model="org/small",neuron="a"} 3.0',
                'cortex_cold_starts_total{model="org/small",neuron="a"} 1.0',
                'cortex_model_load_seconds_count{model="org/small",neuron="a"} 1.0',
                'cortex_in_flight{model="org/small",neuron="a"} 0.0',
                'cortex_neuron_up{neuron="a"} 1.0',
            ]
            missing = [line for line in expected if line not in text]
            assert not missing, text
            assert "# TYPE cortex_evictions_total counter" in text


async def test_shutdown_drains_the_stream_in_flight() -> None:
    hold = trio.Event()
    a = FakeNeuron("a", preload=["org/small"], hold=hold)
    received = []

    async def stream(fleet) -> None:
        response = await fleet.client.post("/v1/chat/completions", json=STREAM)
        received.append(response.content)

    with trio.fail_after(10):
        async with running_fleet([a], MODELS, grace_period=5.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, fleet)
                await a.request_arrived.wait()
                fleet.shutdown.set()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                hold.set()
            assert received == [a.sent[-1]]


async def test_an_idle_keep_alive_connection_does_not_hold_the_shutdown() -> None:
    # After a request each, both servers hold an idle keep-alive connection:
    # the gateway its client's, the neuron the gateway's pool's. Nothing is
    # in flight: both stop at once, not after their 30 s grace period.
    a = FakeNeuron("a", preload=["org/small"], grace_period=30.0)
    shutdown, stopped = trio.Event(), trio.Event()

    async def gateway(*, task_status: trio.TaskStatus) -> None:
        config = _config([a], "lru", None, {"grace_period": 30.0})
        try:
            await run_gateway(config, MODELS, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(start_fake, a)
            handle = await nursery.start(gateway)
            await handle.state.wait_polled()
            async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as client:
                assert (await client.get("/v1/models")).status_code == 200
                whole = {**STREAM, "stream": False}
                assert (await client.post(STREAM_PATH, json=whole)).status_code == 200
                assert (await client.get("/health")).status_code == 200
                shutdown.set()
                a.shutdown.set()
                shutdown_at = trio.current_time()
                await stopped.wait()
                await a.stopped.wait()
                assert trio.current_time() - shutdown_at < 2.0


async def test_metrics_are_served_while_the_api_drains() -> None:
    # A stream runs on after the shutdown: the metrics listener stays up
    # until the API has drained, so what the drain counts can be scraped.
    hold = trio.Event()
    a = FakeNeuron("a", preload=["org/small"], hold=hold)
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, grace_period=5.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(fleet.client.post, STREAM_PATH, json=STREAM))
                await a.request_arrived.wait()
                fleet.shutdown.set()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                # A new connection, as a scraper's.
                async with httpx.AsyncClient(timeout=5) as scraper:
                    scraped = await scraper.get(fleet.handle.metrics_url + "/metrics")
                hold.set()
    assert scraped.status_code == 200
    assert 'cortex_in_flight{model="org/small",neuron="a"} 1.0' in scraped.text


@pytest.mark.parametrize("path", [STREAM_PATH, "/v1/messages"])
async def test_a_stream_cut_at_once_ends_with_an_error_event(path: str, caplog) -> None:
    # A second signal cancels the gateway outright: a stream under way
    # still ends with the dialect's error event, and the log says it was cut.
    a = FakeNeuron("a", preload=["org/small"], hold_mid=trio.Event())
    body = STREAM if path == STREAM_PATH else MESSAGES_STREAM
    caplog.set_level(logging.INFO, logger="cortex.gateway")

    gateway_scope = trio.CancelScope()

    async def gateway(*, task_status: trio.TaskStatus) -> None:
        config = _config([a], "lru", None, {"grace_period": 30.0})
        with gateway_scope:
            await run_gateway(config, MODELS, shutdown=trio.Event(), task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(start_fake, a)
            handle = await nursery.start(gateway)
            async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as client:
                async with client.stream("POST", path, json=body) as response:
                    chunks = response.aiter_raw()
                    received = await anext(chunks)
                    gateway_scope.cancel()  # what a second SIGTERM does
                    received += b"".join([chunk async for chunk in chunks])
            a.hold_mid.set()
            a.shutdown.set()
    last = SSEDecoder().feed(received)[-1]
    message = "the gateway stopped at once"
    if path == STREAM_PATH:
        assert message in json.loads(last.data)["error"]["message"]
    else:
        assert last.event == "error" and message in json.loads(last.data)["error"]["message"]
    logged = [r.getMessage() for r in caplog.records]
    # Its one log line says why (an error event was sent: nothing more added).
    cut = [m for m in logged if "error=server_error: the gateway stopped at once" in m]
    assert len(cut) == 1 and " 503 " in cut[0] and "no error answer sent" not in cut[0], logged


async def test_shutdown_ends_what_outlives_the_grace_period_with_an_error(caplog) -> None:
    # Streams stuck mid-way (both dialects) and a request stuck before its
    # first byte, at shutdown: past grace_period each ends with the
    # dialect's error, logged as the gateway's 503, not as a client that left.
    a = FakeNeuron("a", preload=["org/small"], fault="hang_mid_stream", parallel=4)
    received: dict[str, bytes] = {}

    async def ask(fleet, name: str, path: str, body: dict) -> None:
        async with fleet.client.stream("POST", path, json=body) as response:
            received[name] = b"".join([chunk async for chunk in response.aiter_raw()])
            received[name + " status"] = str(response.status_code).encode()

    caplog.set_level(logging.INFO, logger="cortex.gateway.proxy")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, grace_period=0.5, idle_timeout=30.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, fleet, "openai", STREAM_PATH, STREAM)
                nursery.start_soon(ask, fleet, "anthropic", "/v1/messages", MESSAGES_STREAM)
                await inference_requests(a, 2)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                a.fault = "hang_before_first_byte"
                nursery.start_soon(ask, fleet, "whole", STREAM_PATH, {**STREAM, "stream": False})
                await inference_requests(a, 3)
                fleet.shutdown.set()
                shutdown_at = trio.current_time()
            assert trio.current_time() - shutdown_at < 1.0
    openai_events = SSEDecoder().feed(received["openai"])
    error = json.loads(openai_events[-1].data)["error"]
    assert "the gateway shut down" in error["message"] and len(openai_events) == 3
    anthropic_events = SSEDecoder().feed(received["anthropic"])
    assert anthropic_events[-1].event == "error"
    assert "the gateway shut down" in json.loads(anthropic_events[-1].data)["error"]["message"]
    assert received["whole status"] == b"503"
    assert "the gateway shut down" in json.loads(received["whole"])["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if "request_id=" in r.getMessage()]
    assert sorted(line.split()[:2][1] for line in logged) == ["503", "503", "529"], logged


async def test_a_request_the_server_cuts_at_shutdown_is_logged_as_503(caplog) -> None:
    # Waiting on a cold load (no neuron wait to end): the server cuts it
    # after the grace period; the log says the gateway shut down, not 499.
    a = FakeNeuron("a", load_gate=trio.Event())

    async def ask(fleet) -> None:
        with pytest.raises(httpx.RemoteProtocolError):
            await fleet.chat("org/small")

    caplog.set_level(logging.INFO, logger="cortex.gateway.proxy")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, grace_period=0.2) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, fleet)
                await a.load_started.wait()
                fleet.shutdown.set()
    (line,) = [r.getMessage() for r in caplog.records if "request_id=" in r.getMessage()]
    assert line.startswith("chat/completions 503 "), line
    a.load_gate.set()


async def test_a_draining_neuron_is_down_at_the_next_poll_and_finishes_its_stream() -> None:
    # a drains (SIGTERM, grace period) with a stream in flight: its next
    # poll must not wait on a kept-alive connection the draining server no
    # longer serves; a is marked down, new requests go to b, a's stream ends.
    a = favoured(FakeNeuron("a", preload=["org/small"], hold_mid=trio.Event(), grace_period=30.0))
    b = FakeNeuron("b", preload=["org/small"])
    received = []

    async def stream(fleet) -> None:
        response = await fleet.client.post("/v1/chat/completions", json=STREAM)
        received.append(response.content)

    with trio.fail_after(10):
        async with running_fleet([a, b], MODELS, poll_interval=0.2) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, fleet)
                await a.request_arrived.wait()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # two chunks sent
                a.shutdown.set()
                with trio.fail_after(2):
                    while fleet.state.neurons["a"].up:
                        await fleet.state.wait_changed()
                assert (await fleet.chat("org/small", "a new conversation")).status_code == 200
                assert len(b.requests) == 1
                a.hold_mid.set()
            assert received == [a.sent[0]] and received[0].endswith(b"data: [DONE]\n\n")


def error_count(gw: GatewayApp, endpoint: str, status: int) -> float | None:
    return gw.gateway.metrics.registry.get_sample_value(
        "cortex_request_errors_total",
        {"endpoint": endpoint, "model": "org/small", "status": str(status)},
    )


@pytest.mark.parametrize(
    ("path", "body", "endpoint"),
    [
        (STREAM_PATH, STREAM, "chat/completions"),
        ("/v1/messages", MESSAGES_STREAM, "messages"),
    ],
    ids=["openai", "anthropic"],
)
async def test_client_gone_while_the_head_is_sent_closes_the_neuron_stream(
    path: str, body: dict, endpoint: str
) -> None:
    # The stream's relay has not started when the client leaves, so its own
    # finally never runs: the route must be released and the neuron's
    # connection closed all the same.
    a = FakeNeuron("a", preload=["org/small"], fault="hang_mid_stream")
    with trio.fail_after(10):
        async with gateway_app([a], MODELS) as gw:
            answer = await gw.call(path, body, leave_at_head=True)
            assert answer.status == 200 and answer.body == b""
            assert gw.gateway.state.neurons["a"].in_flight.get("org/small", 0) == 0
            assert error_count(gw, endpoint, 499) == 1
            with trio.fail_after(2):
                while a.in_flight.get("org/small"):
                    await a._changed.wait()
            # The route is free: the next request is served.
            a.fault = None
            answer = await gw.call(path, body)
            assert answer.status == 200
            assert answer.body.rstrip().endswith(b"[DONE]" if path == STREAM_PATH else b"}")
            assert (b"message_stop" in answer.body) == (endpoint == "messages")


async def test_streams_teach_the_router_first_token_and_decode_speed() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with gateway_app([a], MODELS) as gw:
            assert (await gw.call("/v1/chat/completions", STREAM)).status == 200
            assert (await gw.call("/v1/messages", MESSAGES_STREAM)).status == 200
            registry = gw.gateway.metrics.registry
            observed = registry.get_sample_value(
                "cortex_observed_time_to_first_token_seconds_count", {"kind": "loaded"}
            )
            assert observed == 2
            seen = gw.gateway.router.observations
            assert seen.completion["org/small"].count == 2
            assert seen.completion["org/small"].value == len(a.reply.split())
            tps = seen.decode_tps[("a", "org/small")]
            assert tps.count == 2 and tps.value is not None and tps.value > 0


@pytest.mark.parametrize("fault", ["end_mid_stream", "die_mid_stream"])
async def test_anthropic_stream_cut_short_ends_with_an_error_event(fault: str) -> None:
    # No finish_reason came: the answer is incomplete, not an end_turn.
    a = FakeNeuron("a", preload=["org/small"], fault=fault)
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post("/v1/messages", json=MESSAGES_STREAM)
            assert response.status_code == 200
            events = SSEDecoder().feed(response.content)
            names = [event.event for event in events]
            assert names[0] == "message_start" and names[-1] == "error", names
            assert "message_delta" not in names and "message_stop" not in names
            error = json.loads(events[-1].data)
            assert error["type"] == "error" and error["error"]["type"] == "api_error"
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            assert (
                'cortex_request_errors_total{endpoint="messages",model="org/small",'
                'status="502"} 1.0' in metrics
            )


def _kept_alive(events: list[dict]) -> int:
    """The keep-alives among ``events``: empty text deltas."""
    return sum(e["type"] == "content_block_delta" and e["delta"] == _EMPTY for e in events)


_EMPTY = {"type": "text_delta", "text": ""}


async def _anthropic_events(fleet, neuron: FakeNeuron, keep_alives: int) -> list[dict]:
    """The events of a streamed /v1/messages, letting the neuron answer after ``keep_alives``."""
    events = []
    decoder = SSEDecoder()
    async with fleet.client.stream("POST", "/v1/messages", json=MESSAGES_STREAM) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                events.append(json.loads(event.data))
                if _kept_alive(events) == keep_alives:
                    neuron.hold.set()
    return events


@pytest.mark.parametrize("fault", [None, "die_before_first_byte"])
async def test_an_anthropic_stream_slow_to_its_first_byte_starts_and_keeps_alive(
    monkeypatch, fault: str | None
) -> None:
    # Claude Code gives up on a stream silent for 300 s, pings counting as
    # silence: a long prompt (or a cold load) gets message_start and a text
    # block whose empty deltas keep it alive; the answer goes on in it.
    from cortex.gateway import exchange

    monkeypatch.setattr(exchange, "EARLY_START_S", 0.2)
    monkeypatch.setattr(exchange, "KEEP_ALIVE_S", 0.2)
    a = FakeNeuron("a", preload=["org/small"], hold=trio.Event(), fault=fault)
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            events = await _anthropic_events(fleet, a, keep_alives=2)
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert kinds.count("message_start") == 1 and "ping" not in kinds
    if fault is None:
        assert kinds[-1] == "message_stop"
        assert kinds.count("content_block_start") == 1
        text = "".join(
            e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"
        )
        assert text == a.reply
    else:
        # The neuron failed before its first byte and nothing else could take
        # it: what would have been a 529 is the stream's error event.
        assert kinds[-1] == "error"
        assert events[-1]["error"]["type"] == "overloaded_error"
        assert 'status="529"' in metrics
