"""The official openai and anthropic SDKs as clients of the gateway."""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial
from typing import Any

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
            # The SDK picks the class by status and exposes type and code as
            # OpenAI's API sets them, which client code tests.
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(
                    model="no/such", messages=[{"role": "user", "content": "hi"}]
                )
            assert (missing.value.type, missing.value.code) == (
                "invalid_request_error",
                "model_not_found",
            )
            with pytest.raises(openai.AuthenticationError) as refused:
                wrong = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0)
                await stack.enter_async_context(wrong)
                await wrong.models.list()
            assert (refused.value.type, refused.value.code) == (
                "invalid_request_error",
                "invalid_api_key",
            )
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


TOOL = {"name": "f", "input_schema": {"type": "object"}}
USE = {"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}
CALL = {"role": "assistant", "content": [USE]}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_x", "content": "done"}
HI = {"role": "user", "content": "hi"}

#: (what the request adds, the message's start): each a 400 at Anthropic's API too.
INVALID: list[tuple[dict[str, Any], str]] = [
    (
        {"messages": [{"role": "user", "content": [USE]}], "tools": [TOOL]},
        "messages.0.content.0: a tool_use block belongs in an assistant message",
    ),
    (
        {"messages": [HI, {"role": "assistant", "content": [RESULT]}], "tools": [TOOL]},
        "messages.1.content.0: a tool_result block belongs in a user message",
    ),
    (
        {
            "messages": [
                HI,
                CALL,
                {"role": "user", "content": [{**RESULT, "tool_use_id": "toolu_y"}]},
            ],
            "tools": [TOOL],
        },
        "messages.2.content.0: unexpected tool_use_id found in tool_result blocks: toolu_y. "
        "Each tool_result block must have a corresponding tool_use block in the previous message.",
    ),
    (
        {"messages": [HI, CALL, {"role": "user", "content": "and?"}], "tools": [TOOL]},
        "messages.1: tool_use ids were found without tool_result blocks immediately after: "
        "toolu_x. Each tool_use block must have a corresponding tool_result block in the next "
        "message.",
    ),
    (
        {"messages": [HI, CALL, {"role": "user", "content": [RESULT]}]},
        "messages.1.content.0: a request with tool_use or tool_result blocks must define tools",
    ),
    ({"tools": [{"name": "x", "description": "d"}]}, "tools.0.input_schema: field required"),
    ({"tools": [{**TOOL, "name": "read file"}]}, "tools.0.name must be 1 to 64 letters"),
    ({"thinking": {"type": "bogus"}}, "thinking.type must be enabled"),
    ({"metadata": {"user_id": "u", "plan": "x"}}, "metadata.plan: unknown field"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id must be a string"),
    ({"service_tier": "priority"}, "service_tier must be auto or standard_only"),
    (
        {"mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]},
        "mcp_servers is not supported",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages.0.content.0.text must be a string",
    ),
]


async def test_anthropic_sdk_invalid_requests_are_400_in_anthropics_words() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            for extra, message in INVALID:
                body = {"messages": [HI], **extra}
                calls = [partial(client.messages.create, max_tokens=3)]
                if not {"metadata", "service_tier"} & set(extra):
                    # count_tokens validates the fields it shares with create alike.
                    calls.append(client.messages.count_tokens)
                for call in calls:
                    with pytest.raises(anthropic.BadRequestError) as caught:
                        await call(model="org/small", messages=[], extra_body=body)
                    assert caught.value.body["type"] == "error"
                    assert caught.value.body["error"]["type"] == "invalid_request_error"
                    assert caught.value.body["error"]["message"].startswith(message), extra
            with pytest.raises(anthropic.BadRequestError, match="needs tools"):
                await client.messages.count_tokens(
                    model="org/small", messages=[HI], tool_choice={"type": "any"}
                )
            assert not [path for path, _, _ in a.requests if path != "/tokenize"]

            # What Claude Code sends: results first, text after, a system reminder.
            followed = await client.messages.create(
                model="org/small",
                max_tokens=3,
                tools=[TOOL],  # type: ignore[list-item]
                thinking={"type": "adaptive"},  # type: ignore[typeddict-item]
                metadata={"user_id": '{"session_id": "s"}'},
                service_tier="auto",
                messages=[  # type: ignore[list-item]
                    HI,
                    CALL,
                    {"role": "user", "content": [RESULT, {"type": "text", "text": "go on"}]},
                    {"role": "system", "content": "reminder"},
                ],
            )
            assert followed.type == "message"
            sent = a.requests[-1][1]["messages"]
            assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user", "system"]


async def test_anthropic_sdk_models_in_anthropics_shape() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=[KEY]) as fleet, AsyncExitStack() as stack:
            client = await stack.enter_async_context(anthropic_client(fleet.url))
            page = await client.models.list()
            assert [m.id for m in page.data] == ["org/small", "claude-sonnet"]
            assert not page.has_more
            first = page.data[0]
            assert (first.type, first.display_name) == ("model", "org/small")
            assert first.max_input_tokens == 4096  # the context the neuron reports
            assert first.created_at.tzinfo is not None
            assert first.model_extra is not None and first.model_extra["loaded"] is True
            # One a page: the SDK follows after_id to the end.
            paged = [m.id async for m in await client.models.list(limit=1)]
            assert paged == ["org/small", "claude-sonnet"]
            one = await client.models.list(limit=1)
            assert (one.first_id, one.last_id, one.has_more) == ("org/small", "org/small", True)
            before = await client.models.list(before_id="claude-sonnet")
            assert [m.id for m in before.data] == ["org/small"] and not before.has_more

            alias = await client.models.retrieve("claude-sonnet")
            assert (alias.id, alias.type, alias.display_name) == (
                "claude-sonnet",
                "model",
                "claude-sonnet",
            )
            assert alias.model_extra is not None and alias.model_extra["alias_of"] == "org/small"
            with pytest.raises(anthropic.NotFoundError) as missing:
                await client.models.retrieve("no-such")
            assert missing.value.body["error"]["type"] == "not_found_error"
            with pytest.raises(anthropic.BadRequestError, match="limit must be at most 1000"):
                await client.models.list(limit=1001)
            with pytest.raises(anthropic.BadRequestError, match="after_id: no model 'gone'"):
                await client.models.list(after_id="gone")
            wrong = anthropic.AsyncAnthropic(base_url=fleet.url, api_key="bad", max_retries=0)
            await stack.enter_async_context(wrong)
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await wrong.models.list()
            assert refused.value.body["error"]["type"] == "authentication_error"

            # Raw HTTP: the header decides; without it, OpenAI's shape as before.
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
            raw = await fleet.client.get("/v1/models?limit=1", headers=headers)
            assert raw.headers["request-id"]
            assert raw.json()["data"][0]["created_at"].endswith("Z")
            assert set(raw.json()) == {"data", "has_more", "first_id", "last_id"}
            nowhere = await fleet.client.get("/v1/nothing", headers=headers)
            assert nowhere.status_code == 404
            assert nowhere.json()["error"]["type"] == "not_found_error"
            plain = await fleet.client.get("/v1/models", headers={"x-api-key": KEY})
            assert plain.json()["object"] == "list"
            assert plain.json()["data"][0]["object"] == "model"
            unknown = await fleet.client.get("/v1/models/no-such", headers={"x-api-key": KEY})
            assert unknown.status_code == 404 and "param" in unknown.json()["error"]
