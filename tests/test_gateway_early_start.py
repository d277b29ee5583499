"""OpenAI streams slow to their first token, through the official openai SDK.

A long prompt on a CPU host takes minutes before its first token; a client
or proxy with a read timeout (nginx's 60 s) would give up on a stream that
sends nothing. The gateway starts such a stream early and keeps it alive
(``exchange.EARLY_START_S``, ``KEEP_ALIVE_S``, made short here): chat and
completions with SSE comments, Responses with ``response.created`` and
``response.in_progress`` first. The scripted engine's ``delay`` is the long
prompt.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio

from cortex.config import CatalogModel, ModelsFile
from cortex.gateway import exchange
from cortex.neuron.models import LoadRequest
from cortex.wire.sse import KEEP_ALIVE, SSEDecoder
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import install_scripted_engine, running_gateway, write_script

#: Seconds the scripted engine holds its first token.
DELAY = 1.5
REPLY = "Worth the wait."
SCRIPT = {"rules": [{"when": "take your time", "delay": DELAY, "reply": REPLY}]}
FAKE_MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))


@pytest.fixture(autouse=True)
def early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange, "EARLY_START_S", 0.2)
    monkeypatch.setattr(exchange, "KEEP_ALIVE_S", 0.2)


@pytest.fixture
async def slow_fleet(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A gateway and a neuron whose scripted model takes ``DELAY`` s to a first token."""
    install_scripted_engine(tmp_path, monkeypatch)
    source = write_script(tmp_path, "slow", SCRIPT)
    async with running_neuron([], options={}) as neuron:
        await neuron.neuron.manager.load(LoadRequest(model_id="scripted", source=source))
        models = ModelsFile(models=[CatalogModel(id="scripted", vram_mb=1)])
        async with running_gateway(neuron.url, models) as gateway:
            yield gateway.api_url


class _Recorded(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, into: bytearray) -> None:
        self.stream = stream
        self.into = into

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.into += chunk
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class Wire(httpx.AsyncBaseTransport):
    """The SDK's transport, recording when the last answer's head came and its bytes."""

    def __init__(self) -> None:
        self.transport = httpx.AsyncHTTPTransport()
        self.head_after: float | None = None
        self.received = bytearray()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = trio.current_time()
        response = await self.transport.handle_async_request(request)
        self.head_after = trio.current_time() - sent
        self.received = bytearray()
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Recorded(response.stream, self.received),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.transport.aclose()


@asynccontextmanager
async def sdk(url: str, wire: Wire) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx.AsyncClient(transport=wire, timeout=30)
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="sk-test", max_retries=0, http_client=http
    ) as client:
        yield client


def assert_started_early(wire: Wire) -> None:
    """The head came long before the first token, then comments kept the stream alive."""
    assert wire.head_after is not None and wire.head_after < DELAY - 0.5, wire.head_after
    assert wire.received.count(KEEP_ALIVE) >= 3, bytes(wire.received[:300])


async def test_a_slow_chat_stream_starts_early_and_the_sdk_skips_the_keep_alives(
    slow_fleet: str,
) -> None:
    wire = Wire()
    with trio.fail_after(30):
        async with sdk(slow_fleet, wire) as client:
            stream = await client.chat.completions.create(
                model="scripted",
                messages=[{"role": "user", "content": "take your time"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    assert_started_early(wire)
    assert wire.received.startswith(KEEP_ALIVE * 3)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    # No invented first chunk: the role comes with the first token, as before.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_a_slow_completions_stream_starts_early_and_the_sdk_skips_the_keep_alives(
    slow_fleet: str,
) -> None:
    wire = Wire()
    with trio.fail_after(30):
        async with sdk(slow_fleet, wire) as client:
            stream = await client.completions.create(
                model="scripted", prompt="take your time", stream=True
            )
            chunks = [chunk async for chunk in stream]
    assert_started_early(wire)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_slow_responses_stream_begins_with_created_and_goes_on_as_one_response(
    slow_fleet: str,
) -> None:
    wire = Wire()
    with trio.fail_after(30):
        async with sdk(slow_fleet, wire) as client:
            # The SDK's stream helper checks the order and that every
            # lifecycle event names the same response.
            async with client.responses.stream(
                model="scripted", input="take your time", instructions="Be patient."
            ) as stream:
                events = [event async for event in stream]
                final = await stream.get_final_response()
    assert_started_early(wire)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.created") == kinds.count("response.in_progress") == 1
    assert kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, completed = events[0].response, events[-1].response
    assert (created.id, created.created_at) == (completed.id, completed.created_at)
    assert created.model == completed.model == "scripted"
    assert created.instructions == completed.instructions == "Be patient."
    assert created.temperature == completed.temperature
    assert final.output_text == REPLY
    # created and in_progress went first, before the keep-alives.
    decoded = SSEDecoder().feed(bytes(wire.received))
    assert [e.event for e in decoded[:2]] == kinds[:2]
    assert wire.received.index(KEEP_ALIVE) > wire.received.index(b"response.in_progress")


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
async def test_a_failure_after_an_early_start_is_an_error_chunk_the_sdk_raises(
    endpoint: str,
) -> None:
    # The neuron dies before its first byte and nothing else can take the
    # request: what would have been a 503 is the stream's error chunk.
    a = FakeNeuron("a", preload=["org/small"], hold=trio.Event(), fault="die_before_first_byte")
    wire = Wire()
    with trio.fail_after(20):
        async with running_fleet([a], FAKE_MODELS) as fleet, sdk(fleet.url, wire) as client:
            stream: Any
            if endpoint == "chat/completions":
                stream = await client.chat.completions.create(
                    model="org/small", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            else:
                stream = await client.completions.create(
                    model="org/small", prompt="hi", stream=True
                )
            a.hold.set()  # the head has come: the stream is committed
            with pytest.raises(openai.APIError, match="org/small") as caught:
                async for _ in stream:
                    pass
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
    assert caught.value.body["type"] == "server_error"  # type: ignore[index]
    assert wire.received.startswith(KEEP_ALIVE)
    assert wire.received.endswith(b"\n\n") and b"[DONE]" not in wire.received
    assert (
        f'cortex_request_errors_total{{endpoint="{endpoint}",model="org/small",status="503"}}'
        in metrics
    )


async def test_a_failure_after_an_early_start_is_response_failed() -> None:
    a = FakeNeuron("a", preload=["org/small"], hold=trio.Event(), fault="die_before_first_byte")
    with trio.fail_after(20):
        async with running_fleet([a], FAKE_MODELS) as fleet, sdk(fleet.url, Wire()) as client:
            stream = await client.responses.create(model="org/small", input="hi", stream=True)
            a.hold.set()
            events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    assert [event.sequence_number for event in events] == [0, 1, 2]
    failed = events[-1].response
    assert failed.id == events[0].response.id and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert "org/small" in failed.error.message


async def test_a_failure_before_the_early_start_is_still_an_http_error() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_before_first_byte")
    with trio.fail_after(20):
        async with running_fleet([a], FAKE_MODELS) as fleet, sdk(fleet.url, Wire()) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.responses.create(model="org/small", input="hi", stream=True)
    assert caught.value.status_code == 503
    assert json.loads(caught.value.response.content)["error"]["type"] == "server_error"
