"""The official openai and anthropic SDKs as clients of the gateway."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anthropic
import openai
import pytest
import trio

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

MODELS = catalogue(
    CatalogModel(id="org/small", vram_mb=100, sampling={"temperature": 0.3}),
    aliases={"claude-sonnet": "org/small"},
)
KEY = "sk-test"


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0)


async def test_openai_sdk_chat() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(openai_client(fleet.url))
            completion = await client.chat.completions.create(
                model="org/small", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content == a.reply
            assert completion.choices[0].finish_reason == "stop"
            assert completion.usage is not None and completion.usage.completion_tokens == 5

            stream = await client.chat.completions.create(
                model="org/small",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage
            assert text == a.reply
            assert usage is not None and usage.completion_tokens == 5

            models = await client.models.list()
            assert {m.id for m in models.data} == {"org/small", "claude-sonnet"}


async def test_openai_sdk_errors() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_mid_stream")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(openai_client(fleet.url))
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(
                    model="no/such", messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.AuthenticationError):
                wrong = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0)
                await stack.enter_async_context(wrong)
                await wrong.models.list()
            stream = await client.chat.completions.create(
                model="org/small", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with pytest.raises(openai.APIError, match="mid-stream"):
                async for _ in stream:
                    pass


async def test_anthropic_sdk_messages() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            message = await client.messages.create(
                model="claude-sonnet",
                max_tokens=100,
                system="be brief",
                messages=[{"role": "user", "content": "say hello please"}],
            )
            assert message.content[0].text == a.reply
            assert message.stop_reason == "end_turn"
            assert message.usage.input_tokens == 5 and message.usage.output_tokens == 5
            sent = a.requests[-1][1]
            assert sent["model"] == "org/small"
            assert sent["messages"][0] == {"role": "system", "content": "be brief"}
            assert sent["temperature"] == 0.3  # the catalogue's default

            message = await client.messages.create(
                model="org/small",
                max_tokens=100,
                stop_sequences=["fake"],
                messages=[{"role": "user", "content": "hi"}],
            )
            assert message.stop_reason == "stop_sequence"
            assert message.stop_sequence == "fake"
            assert message.content[0].text == "Hello from the"

            message = await client.messages.create(
                model="org/small", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
            assert message.stop_reason == "max_tokens"


async def test_anthropic_sdk_streaming() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            async with client.messages.stream(
                model="claude-sonnet",
                max_tokens=100,
                messages=[{"role": "user", "content": "one two three"}],
            ) as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_message()
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
            assert "content_block_start" in kinds and "message_delta" in kinds
            assert final.content[0].text == a.reply
            assert final.stop_reason == "end_turn"
            assert final.usage.output_tokens == 5 and final.usage.input_tokens == 3
            # message_start got the count from the neuron's tokenizer.
            assert any(path == "/tokenize" for path, _, _ in a.requests)
            chat = [body for path, body, _ in a.requests if path == "/v1/chat/completions"]
            assert chat[-1]["stream_options"] == {"include_usage": True}


async def test_anthropic_sdk_errors_and_count_tokens() -> None:
    a = FakeNeuron("a", preload=["org/small"], fault="die_mid_stream")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            with pytest.raises(anthropic.NotFoundError):
                await client.messages.create(
                    model="no/such", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(anthropic.AuthenticationError):
                wrong = anthropic.AsyncAnthropic(base_url=fleet.url, api_key="x", max_retries=0)
                await stack.enter_async_context(wrong)
                await wrong.messages.create(
                    model="org/small", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(anthropic.APIStatusError):
                async with client.messages.stream(
                    model="org/small", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    async for _ in stream:
                        pass
            count = await client.messages.count_tokens(
                model="claude-sonnet",
                messages=[{"role": "user", "content": "four words right here"}],
            )
            assert count.input_tokens == 4


async def test_anthropic_beta_query_and_headers() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post(
                "/v1/messages?beta=true",
                headers={
                    "anthropic-version": "2023-06-01",
                    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
                    "x-api-key": "anything",
                },
                json={
                    "model": "org/small",
                    "max_tokens": 32000,
                    "stream": False,
                    "system": [
                        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}
                    ],
                    "thinking": {"type": "adaptive"},
                    "metadata": {"user_id": '{"x": 1}'},
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert response.status_code == 200, response.text
            assert response.headers["request-id"]
            assert response.json()["type"] == "message"
            # max_tokens goes through unclamped: the neuron clamps it.
            assert a.requests[-1][1]["max_tokens"] == 32000


async def test_anthropic_requests_nothing_here_can_honour_are_400() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    hi = [{"role": "user", "content": "hi"}]
    refused: list[tuple[dict[str, object], str]] = [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": "tool", "name": "f"}}, "tool_choice"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages must hold a user"),
    ]
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            for extra, named in refused:
                kwargs: dict[str, object] = {"model": "org/small", "max_tokens": 5, "messages": hi}
                with pytest.raises(anthropic.BadRequestError) as caught:
                    await client.messages.create(**{**kwargs, **extra})  # type: ignore[arg-type]
                assert caught.value.body["error"]["type"] == "invalid_request_error"
                assert named in caught.value.body["error"]["message"], extra
            # Claude Code's mid-conversation system message is still taken.
            message = await client.messages.create(
                model="org/small",
                max_tokens=5,
                messages=[*hi, {"role": "system", "content": "be brief"}],  # type: ignore[list-item]
                tools=[{"name": "f", "input_schema": {"type": "object"}, "type": "custom"}],
            )
            assert message.stop_reason == "end_turn"
            assert len(a.requests) == 1
