"""Streaming passthrough, faults before and after the first byte, metrics."""

from __future__ import annotations

import json
import time
from functools import partial

import trio
import trio.testing

from cortex.config import CatalogModel
from cortex.wire.sse import SSEDecoder
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
STREAM = {
    "model": "org/small",
    "messages": [{"role": "user", "content": "say hello"}],
    "stream": True,
    "stream_options": {"include_usage": True},
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
            assert last["error"]["type"] == "upstream_timeout"
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
            response = await fleet.chat("org/small")
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
            assert error["type"] == "upstream_error" and "mid-stream" in error["message"]
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
            assert response.json()["error"]["type"] == "upstream_timeout"
            response = await fleet.chat("org/small")
            assert response.status_code == 504
            a.fault = None
            assert (await fleet.chat("org/small")).status_code == 200


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
