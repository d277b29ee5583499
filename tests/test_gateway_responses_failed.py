"""A Responses stream the gateway has to end after its first byte ends with ``response.failed``.

The neuron dies or falls silent mid-way, or the shutdown's grace period
runs out: the stream's last event is a Responses event (the Vercel AI SDK's
``openai.responses()`` provider validates every frame as one, and fails
with ``AI_TypeValidationError`` on a chat-style ``{"error": ...}`` chunk),
naming the response the neuron began and numbered on from its last event.
Checked with the official openai SDK, and with the AI SDK where
``CORTEX_AI_SDK`` names a folder whose ``node_modules`` hold ``ai`` and
``@ai-sdk/openai``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
import trio
import trio.testing

from cortex.config import CatalogModel
from cortex.gateway.app import run_gateway
from cortex.wire.sse import SSEDecoder
from tests.gateway_helpers import FakeNeuron, _config, catalogue, running_fleet, start_fake

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
#: Events before the fault: created, in_progress, the message and its
#: part opened, two text deltas.
MID = 6
REPLY = "Hello from the fake neuron"


@asynccontextmanager
async def sdk(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as c:
        yield c


async def stream_events(url: str) -> list[Any]:
    """The events of a Responses stream, through the SDK's stream helper.

    The helper checks that every lifecycle event names the same response.
    """
    async with sdk(url) as client:
        async with client.responses.stream(model="org/small", input="hello") as stream:
            return [event async for event in stream]


def assert_failed(events: list[Any], message: str) -> None:
    """Text, then ``response.failed`` for the same response, numbered without a gap."""
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.failed" and "error" not in kinds, kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["Hello ", "from "]
    failed, created = events[-1].response, events[0].response
    assert (failed.id, failed.created_at, failed.model) == (
        created.id,
        created.created_at,
        created.model,
    )
    assert failed.status == "failed" and failed.output == []
    assert failed.error is not None and message in failed.error.message, failed.error


def assert_all_responses_events(raw: bytes) -> None:
    """Every frame is a named Responses event whose data says the same ``type``."""
    for event in SSEDecoder().feed(raw):
        data = json.loads(event.data)
        assert event.event == data["type"] and "error" not in data, event


@pytest.mark.parametrize(
    ("fault", "message"),
    [("die_mid_stream", "neuron a"), ("hang_mid_stream", "neuron a sent nothing")],
)
async def test_a_neuron_that_fails_mid_stream_ends_it_with_response_failed(
    fault: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.gateway")
    a = FakeNeuron("a", preload=["org/small"], fault=fault, mid=MID)
    with trio.fail_after(20):
        async with running_fleet([a], MODELS, idle_timeout=0.5) as fleet:
            events = await stream_events(fleet.url)
            async with fleet.client.stream(
                "POST", "/v1/responses", json={"model": "org/small", "input": "hi", "stream": True}
            ) as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert_failed(events, message)
    assert_all_responses_events(raw)
    # What the neuron sent is passed on as it came.
    assert raw.startswith(a.sent[-1])
    assert_one_line_each_says_why(caplog, "responses 50", message)


def assert_one_line_each_says_why(caplog: pytest.LogCaptureFixture, line: str, why: str) -> None:
    """Each request is one log line, its error's reason on it (README: Logs)."""
    said = [r.getMessage() for r in caplog.records if r.name.startswith("cortex.gateway")]
    lines = [m for m in said if m.startswith(line)]
    assert lines and all(" error=" in m and why in m for m in lines), said
    ids = [m.rsplit("request_id=", 1)[1].split()[0] for m in lines]
    assert not [m for m in said if m not in lines and any(i in m for i in ids)], said


async def test_the_shutdowns_grace_period_ends_a_responses_stream_with_response_failed() -> None:
    a = FakeNeuron("a", preload=["org/small"], hold_mid=trio.Event(), mid=MID)
    events: list[Any] = []

    async def ask(url: str) -> None:
        events.extend(await stream_events(url))

    with trio.fail_after(20):
        async with running_fleet([a], MODELS, grace_period=0.5, idle_timeout=30.0) as fleet:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, fleet.url)
                await a.request_arrived.wait()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # MID events sent
                fleet.shutdown.set()
        a.hold_mid.set()
    assert_failed(events, "the gateway shut down")


async def test_a_responses_stream_cut_at_once_ends_with_response_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A second signal cancels the gateway outright (Pipeline.cut_short).
    caplog.set_level(logging.INFO, logger="cortex.gateway")
    a = FakeNeuron("a", preload=["org/small"], hold_mid=trio.Event(), mid=MID)
    gateway_scope = trio.CancelScope()
    events: list[Any] = []

    async def gateway(*, task_status: trio.TaskStatus) -> None:
        config = _config([a], "lru", None, {"grace_period": 30.0})
        with gateway_scope:
            await run_gateway(config, MODELS, shutdown=trio.Event(), task_status=task_status)

    async def ask(url: str) -> None:
        events.extend(await stream_events(url))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(start_fake, a)
            handle = await nursery.start(gateway)
            await handle.state.wait_polled()
            async with trio.open_nursery() as clients:
                clients.start_soon(ask, handle.api_url)
                await a.request_arrived.wait()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                gateway_scope.cancel()  # what a second SIGTERM does
            a.hold_mid.set()
            a.shutdown.set()
    assert_failed(events, "the gateway stopped at once")
    assert_one_line_each_says_why(caplog, "responses 503", "the gateway stopped at once")


async def test_chat_keeps_its_error_chunk_after_the_first_byte() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_mid_stream")
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet, sdk(fleet.url) as client:
            stream = await client.chat.completions.create(
                model="org/small", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with pytest.raises(openai.APIError, match="neuron a"):
                async for _ in stream:
                    pass


# -- the Vercel AI SDK --------------------------------------------------------------

AI_SDK = os.environ.get("CORTEX_AI_SDK", "")
NODE = shutil.which("node")

#: streamText over openai.responses(): the stream's parts, errors with their name and type.
AI_SDK_SCRIPT = """
import { createOpenAI } from '@ai-sdk/openai';
import { streamText } from 'ai';
const provider = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: 'sk-test' });
const result = streamText({ model: provider.responses('org/small'), prompt: 'hi', maxRetries: 0 });
const parts = [];
for await (const part of result.fullStream) {
  parts.push(part.type === 'error'
    ? { type: 'error', name: String(part.error?.name), kind: String(part.error?.type),
        message: String(part.error?.message) }
    : { type: part.type, text: part.text });
}
console.log(JSON.stringify(parts));
"""


@pytest.mark.skipif(
    NODE is None or not (pathlib.Path(AI_SDK) / "node_modules" / "@ai-sdk" / "openai").is_dir(),
    reason="needs node and CORTEX_AI_SDK: a folder whose node_modules hold ai and @ai-sdk/openai",
)
async def test_the_ai_sdk_sees_the_failure_as_the_providers_error() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_mid_stream", mid=MID)
    assert NODE is not None
    with trio.fail_after(30):
        async with running_fleet([a], MODELS) as fleet:
            done = await trio.run_process(
                [NODE, "--input-type=module", "-e", AI_SDK_SCRIPT],
                cwd=AI_SDK,  # where -e resolves its imports
                env={**os.environ, "BASE_URL": fleet.url + "/v1"},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 0, done.stderr.decode()
    parts = json.loads(done.stdout.decode().strip().splitlines()[-1])
    text = "".join(p.get("text") or "" for p in parts if p["type"] == "text-delta")
    assert text == "Hello from "
    errors = [p for p in parts if p["type"] == "error"]
    assert len(errors) == 1, parts
    # Not AI_TypeValidationError: the provider's own error for a failed response.
    assert errors[0]["name"] != "AI_TypeValidationError", errors
    assert errors[0]["kind"] == "response.failed" and "neuron a" in errors[0]["message"]
    assert parts[-1]["type"] == "finish"
