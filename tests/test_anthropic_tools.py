"""Tools through the gateway, end to end: official SDKs -> gateway -> neuron -> scripted engine.

The gateway translates Anthropic messages to chat completions and back
(``cortex/wire/translate.py``); the neuron renders tools and results through
the engine's chat template and parses its tool-call markup. The scripted
engine (``tests/plugins/cortex_scripted.py``) answers per prompt and records
every rendered prompt, so the tests check both what the client got and what
the model saw.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pydantic
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cortex.config import CatalogModel, ModelsFile
from cortex.gateway.app import GatewayHandle
from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import (
    engine_model,
    install_scripted_engine,
    running_gateway,
    write_script,
)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "description": "The local time in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS: list[Any] = [WEATHER, TIME]

PARIS_CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
SCRIPT = {
    "rules": [
        {
            "when": "weather in Paris",
            "tools": True,
            "reply": f"Let me check.\n<tool_call>\n{json.dumps(PARIS_CALL)}\n</tool_call>",
        },
        {"when": "weather in Paris", "tools": False, "reply": "I cannot look that up."},
        {
            "when": "Paris and Rome",
            "reply": (
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}'
                "\n</tool_call>"
            ),
        },
        {"when": "sunny, 21", "reply": "It is sunny and 21 °C in Paris."},
        {"when": "answer briefly", "reply": "Paris is sunny; the time in Rome is unknown."},
        {"when": "broken", "reply": '<tool_call>{"name": oops}</tool_call> sorry'},
        {"when": "count to five", "reply": "one, two, three, four, five"},
        {"when": "capital of France", "reply": '{"city": "Paris", "population": 2100000}'},
        {"when": "tell a story", "reply": "Once upon a time there was a small model."},
        {
            "when": "list the files",
            "reply": (
                "I will list them.\n<tool_call>\n"
                '{"name": "Bash", "arguments": {"command": "ls -la", '
                '"description": "List the files"}}\n</tool_call>'
            ),
        },
    ],
    "default": "Hello! How can I help?",
}

#: Room for a Claude Code-sized prompt (one token a byte), less than its max_tokens.
BIG_CTX = 60_000


@pytest.fixture
async def neuron(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    install_scripted_engine(tmp_path, monkeypatch)
    async with running_neuron(
        [("scripted", write_script(tmp_path, "hermes", SCRIPT))], options={}
    ) as handle:
        await handle.neuron.manager.load(
            LoadRequest(
                model_id="scripted-big",
                source=write_script(tmp_path, "big", SCRIPT),
                options={"n_ctx": BIG_CTX},
            )
        )
        yield handle


@pytest.fixture
async def gateway(neuron: NeuronHandle):
    models = ModelsFile(
        models=[
            CatalogModel(id="scripted", vram_mb=1, sampling={"temperature": 0.25}),
            CatalogModel(id="scripted-big", vram_mb=1),
        ],
        aliases={"claude-sonnet-4-5": "scripted-big", "claude-haiku-4-5": "scripted"},
    )
    async with running_gateway(neuron.url, models) as handle:
        yield handle


@pytest.fixture
def gateway_url(gateway: GatewayHandle) -> str:
    return gateway.api_url


@pytest.fixture
async def client(gateway_url: str):
    async with anthropic.AsyncAnthropic(base_url=gateway_url, api_key="x", max_retries=0) as c:
        yield c


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def without_ids(content: list[Any]) -> list[dict[str, Any]]:
    """Blocks as dicts, tool_use ids blanked (each generation makes new ones)."""
    blocks = [b.model_dump(exclude_none=True) for b in content]
    for block in blocks:
        if block["type"] == "tool_use":
            assert block["id"]
            block["id"] = "*"
        block.pop("citations", None)
    return blocks


RAW = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}


async def stream_message(
    client: anthropic.AsyncAnthropic, **kwargs: Any
) -> tuple[list[Any], anthropic.types.Message]:
    """The raw events of a ``messages.stream()`` and the SDK's final message."""
    async with client.messages.stream(**kwargs) as stream:
        events = [event async for event in stream if event.type in RAW]
        final = await stream.get_final_message()
    return events, final


def attrs_of(data: dict[str, Any]) -> Any:
    """A raw event dict with attribute access, for ``check_block_order``."""
    return type("Event", (), data)


def check_block_order(events: list[Any]) -> None:
    """message_start, then per block start -> deltas -> stop, then message_delta, message_stop."""
    assert events[0].type == "message_start"
    assert [e.type for e in events[-2:]] == ["message_delta", "message_stop"]
    open_index: int | None = None
    seen: list[int] = []
    for event in events[1:-2]:
        if event.type == "content_block_start":
            assert open_index is None, "a block opened before the previous one closed"
            open_index = event.index
            seen.append(event.index)
        elif event.type == "content_block_delta":
            assert event.index == open_index, "a delta outside its open block"
        else:
            assert event.type == "content_block_stop" and event.index == open_index
            open_index = None
    assert open_index is None
    assert seen == list(range(len(seen)))


# -- messages, one call ---------------------------------------------------------------


async def test_tool_use_non_streaming(client: anthropic.AsyncAnthropic, neuron: NeuronHandle):
    with trio.fail_after(10):
        message = await client.messages.create(
            model="scripted",
            max_tokens=200,
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
        )
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [b.type for b in message.content] == ["text", "tool_use"]
    text, call = message.content
    assert text.text == "Let me check."
    assert call.name == "get_weather" and call.input == {"city": "Paris", "unit": "celsius"}
    assert message.usage.input_tokens == len(engine_model(neuron).prompts[-1].encode())
    assert message.usage.output_tokens > 0
    # The tools reached the model in OpenAI form, through its template.
    prompt = engine_model(neuron).prompts[-1]
    assert '"name": "get_weather"' in prompt and "The local time in a city." in prompt
    # No temperature in the request: the catalogue's default applies.
    assert engine_model(neuron).samplings[-1].temperature == 0.25


async def test_tool_use_streaming_matches_the_whole_answer(
    client: anthropic.AsyncAnthropic,
) -> None:
    kwargs: dict[str, Any] = {
        "model": "scripted",
        "max_tokens": 200,
        "messages": ask("What's the weather in Paris?"),
        "tools": TOOLS,
    }
    with trio.fail_after(10):
        whole = await client.messages.create(**kwargs)
        events, final = await stream_message(client, **kwargs)
    assert without_ids(final.content) == without_ids(whole.content)
    assert (final.stop_reason, final.stop_sequence) == ("tool_use", None)
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    check_block_order(events)
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["text", "tool_use"]
    assert starts[1].name == "get_weather" and starts[1].input == {} and starts[1].id
    assert starts[1].id == final.content[1].id
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(fragments) > 3  # streamed in pieces, not one blob at the end
    assert json.loads("".join(fragments)) == {"city": "Paris", "unit": "celsius"}
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens


async def test_parallel_tool_calls(client: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": "scripted",
        "max_tokens": 200,
        "messages": ask("Paris and Rome, please"),
        "tools": TOOLS,
    }
    with trio.fail_after(10):
        whole = await client.messages.create(**kwargs)
        events, final = await stream_message(client, **kwargs)
    for message in (whole, final):
        assert [(b.type, b.name, b.input) for b in message.content] == [
            ("tool_use", "get_weather", {"city": "Paris"}),
            ("tool_use", "get_time", {"city": "Rome"}),
        ]
        assert len({b.id for b in message.content}) == 2
        assert message.stop_reason == "tool_use"
    check_block_order(events)


async def test_three_turns_place_results_after_their_call(
    client: anthropic.AsyncAnthropic, neuron: NeuronHandle
) -> None:
    messages: list[Any] = ask("What's the weather in Paris?")
    with trio.fail_after(10):
        first = await client.messages.create(
            model="scripted", max_tokens=200, messages=messages, tools=TOOLS
        )
        call = first.content[1]
        messages += [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}
                ],
            },
        ]
        events, answer = await stream_message(
            client, model="scripted", max_tokens=200, messages=messages, tools=TOOLS
        )
    assert [b.type for b in answer.content] == ["text"]
    assert answer.content[0].text == "It is sunny and 21 °C in Paris."
    assert answer.stop_reason == "end_turn"
    check_block_order(events)
    prompt = engine_model(neuron).prompts[-1]
    rendered_call = (
        "<|assistant|>Let me check.<tool_call>"
        + '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        + "</tool_call><|end|>"
    )
    assert prompt.endswith(rendered_call + f"<|tool|>{call.id}: sunny, 21 C<|end|><|assistant|>")


async def test_results_go_right_after_their_call(
    client: anthropic.AsyncAnthropic, neuron: NeuronHandle
) -> None:
    messages: list[Any] = ask("Paris and Rome, please")
    with trio.fail_after(10):
        first = await client.messages.create(
            model="scripted", max_tokens=200, messages=messages, tools=TOOLS
        )
        paris, rome = first.content
        messages += [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            # Claude Code's mid-conversation system messages may come between the two.
            {"role": "system", "content": "Reminder: tools may fail."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here you go; answer briefly."},
                    {
                        "type": "tool_result",
                        "tool_use_id": rome.id,
                        "content": [{"type": "text", "text": "clock unavailable"}],
                        "is_error": True,
                    },
                    {"type": "tool_result", "tool_use_id": paris.id, "content": "sunny, 21 C"},
                ],
            },
        ]
        answer = await client.messages.create(
            model="scripted", max_tokens=200, messages=messages, tools=TOOLS
        )
    assert answer.content[0].text == "Paris is sunny; the time in Rome is unknown."
    assert answer.stop_reason == "end_turn"
    prompt = engine_model(neuron).prompts[-1]
    turns = prompt.split("<|end|>")
    calls = next(i for i, t in enumerate(turns) if t.startswith("<|assistant|><tool_call>"))
    # Results right after their call (in the order sent), before the system and user text.
    assert turns[calls + 1 : calls + 5] == [
        f"<|tool|>{rome.id}: Error: clock unavailable",
        f"<|tool|>{paris.id}: sunny, 21 C",
        "<|system|>Reminder: tools may fail.",
        "<|user|>Here you go; answer briefly.",
    ]


# -- tool_choice and stop reasons ---------------------------------------------------------


async def test_tool_choice_mapping(client: anthropic.AsyncAnthropic, neuron: NeuronHandle) -> None:
    model = engine_model(neuron)

    async def ask_with(choice: Any) -> anthropic.types.Message:
        return await client.messages.create(
            model="scripted",
            max_tokens=200,
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
            tool_choice=choice,
        )

    with trio.fail_after(10):
        await ask_with({"type": "any"})
        required = model.grammars[-1]
        await ask_with({"type": "any", "disable_parallel_tool_use": True})
        single = model.grammars[-1]
        await ask_with({"type": "tool", "name": "get_time"})
        named = model.grammars[-1]
        auto = await ask_with({"type": "auto"})
        assert model.grammars[-1] is None
        none = await ask_with({"type": "none"})
        none_prompt = model.prompts[-1]
        with pytest.raises(anthropic.BadRequestError) as unknown:
            await ask_with({"type": "tool", "name": "nope"})
    assert "get_weather" in required and "get_time" in required
    assert "tool-block )*" in required and "tool-block )*" not in single  # one call only
    assert "get_time" in named and "get_weather" not in named
    assert auto.stop_reason == "tool_use"
    assert "# Tools" not in none_prompt and model.grammars[-1] is None
    assert [b.type for b in none.content] == ["text"]
    assert none.content[0].text == "I cannot look that up."
    assert none.stop_reason == "end_turn"
    assert unknown.value.body["type"] == "error"
    assert unknown.value.body["error"]["type"] == "invalid_request_error"
    # In Anthropic's words and notation, not the neuron's OpenAI ones.
    assert (
        unknown.value.body["error"]["message"] == "tool_choice.name: no tool named 'nope' in tools"
    )


class City(pydantic.BaseModel):
    city: str
    population: int


async def test_structured_output_is_constrained_by_its_schema(
    client: anthropic.AsyncAnthropic, neuron: NeuronHandle
) -> None:
    # messages.parse sends output_config.format: the neuron must constrain the answer.
    model = engine_model(neuron)
    with trio.fail_after(10):
        parsed = await client.messages.parse(
            model="scripted",
            max_tokens=200,
            messages=ask("The capital of France, as JSON"),
            output_format=City,
        )
        grammar = model.grammars[-1]
        with pytest.raises(anthropic.BadRequestError) as wrong:
            await client.messages.create(
                model="scripted",
                max_tokens=200,
                messages=ask("hi"),
                extra_body={"output_config": {"format": {"type": "xml"}}},
            )
    assert parsed.parsed_output == City(city="Paris", population=2100000)
    assert grammar is not None and "population" in grammar
    assert "output_config.format" in wrong.value.body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_stop_reason_only_with_a_tool_use_block(
    client: anthropic.AsyncAnthropic, stream: bool
) -> None:
    # Tool markup the engine cannot parse stays text: end_turn, not tool_use.
    kwargs: dict[str, Any] = {
        "model": "scripted",
        "max_tokens": 200,
        "messages": ask("broken"),
        "tools": TOOLS,
    }
    with trio.fail_after(10):
        if stream:
            _, message = await stream_message(client, **kwargs)
        else:
            message = await client.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == '<tool_call>{"name": oops}</tool_call> sorry'
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_and_max_tokens(client: anthropic.AsyncAnthropic, stream: bool) -> None:
    async def create(**kwargs: Any) -> anthropic.types.Message:
        kwargs.setdefault("max_tokens", 200)
        if stream:
            return (await stream_message(client, model="scripted", **kwargs))[1]
        return await client.messages.create(model="scripted", **kwargs)

    with trio.fail_after(10):
        stopped = await create(messages=ask("count to five"), stop_sequences=["four", "three"])
        cut = await create(messages=ask("tell a story"), max_tokens=4)
        plain = await create(messages=ask("count to five"), stop_sequences=["six"])
    assert stopped.content[0].text == "one, two, "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "three")
    assert cut.stop_reason == "max_tokens" and cut.stop_sequence is None
    assert cut.usage.output_tokens == 4
    assert cut.content[0].text == "Once upo"  # two characters a token
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)
    assert plain.content[0].text == "one, two, three, four, five"


@pytest.mark.parametrize("stream", [False, True])
async def test_more_stop_sequences_than_openai_takes(
    client: anthropic.AsyncAnthropic, gateway_url: str, stream: bool
) -> None:
    # Anthropic sets no limit; the neuron, behind its OpenAI route, takes them too.
    stops = ["six", "seven", "eight", "nine", "ten", "three"]
    kwargs: Any = {"model": "scripted", "max_tokens": 200, "messages": ask("count to five")}
    with trio.fail_after(10):
        if stream:
            _, message = await stream_message(client, stop_sequences=stops, **kwargs)
        else:
            message = await client.messages.create(stop_sequences=stops, **kwargs)
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "three")
        assert message.content[0].text == "one, two, "
        with pytest.raises(anthropic.BadRequestError, match="at most 64 strings, got 65"):
            await client.messages.create(stop_sequences=["x"] * 65, **kwargs)
        async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="x") as oai:
            chat = await oai.chat.completions.create(
                model="scripted", messages=ask("count to five"), stop=stops
            )
        assert chat.choices[0].message.content == "one, two, "


@pytest.mark.parametrize("stream", [False, True])
async def test_too_long_prompt_in_anthropic_words(
    client: anthropic.AsyncAnthropic, stream: bool
) -> None:
    # Claude Code recognises "prompt is too long: N tokens > M maximum" and compacts.
    with trio.fail_after(10), pytest.raises(anthropic.BadRequestError) as too_long:
        if stream:
            await stream_message(client, model="scripted", max_tokens=10, messages=ask("x" * 9000))
        else:
            await client.messages.create(model="scripted", max_tokens=10, messages=ask("x" * 9000))
    error = too_long.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: 90\d\d tokens > 8192 maximum", error["message"])


async def test_too_long_prompt_names_the_prompt_field_of_each_route(gateway_url: str) -> None:
    long = "x" * 9000
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="x", max_retries=0
    ) as client:
        with trio.fail_after(10):
            with pytest.raises(openai.BadRequestError) as chat:
                await client.chat.completions.create(model="scripted", messages=ask(long))
            with pytest.raises(openai.BadRequestError) as completion:
                await client.completions.create(model="scripted", prompt=long)
            with pytest.raises(openai.BadRequestError) as response:
                await client.responses.create(model="scripted", input=long)
    # OpenAI's wording on OpenAI's routes: LiteLLM (and so aider) recognises
    # a context window error by it.
    for error, field in ((chat, "messages"), (completion, "prompt"), (response, "input")):
        assert error.value.body["param"] == field
        assert error.value.body["code"] == "context_length_exceeded"
        assert re.fullmatch(
            r"This model's maximum context length is 8192 tokens\. However, your "
            rf"{field} resulted in 90\d\d tokens\. Please reduce the length of the {field}\.",
            error.value.body["message"],
        ), error.value.body["message"]


async def test_count_tokens_with_tools(client: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": "scripted",
        "messages": ask("What's the weather in Paris?"),
        "tools": TOOLS,
        "system": "Be brief.",
    }
    with trio.fail_after(10):
        count = await client.messages.count_tokens(**kwargs)
        message = await client.messages.create(max_tokens=200, **kwargs)
    assert count.input_tokens == message.usage.input_tokens


# -- the OpenAI dialects pass through -----------------------------------------------------

OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": t["name"],
            "description": t["description"],
            "parameters": t["input_schema"],
        },
    }
    for t in TOOLS
]


async def test_openai_chat_tools_through_the_gateway(gateway_url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="x", max_retries=0
    ) as client:
        with trio.fail_after(10):
            whole = await client.chat.completions.create(
                model="scripted", messages=ask("What's the weather in Paris?"), tools=OPENAI_TOOLS
            )
            async with client.chat.completions.stream(
                model="scripted", messages=ask("Paris and Rome"), tools=OPENAI_TOOLS
            ) as stream:
                parallel = await stream.get_final_completion()
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content == "Let me check."
    [call] = whole.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    calls = parallel.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"city": "Rome"}),
    ]
    assert parallel.choices[0].finish_reason == "tool_calls"


OPENAI_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
]


async def test_openai_fields_nothing_here_honours_are_400(gateway_url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="x", max_retries=0
    ) as client:
        with trio.fail_after(10):
            for extra, param in OPENAI_REFUSED:
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.chat.completions.create(
                        model="scripted", messages=ask("hi"), extra_body=extra
                    )
                assert caught.value.body["param"] == param, (extra, caught.value.body)
            with pytest.raises(openai.BadRequestError) as responses:
                await client.responses.create(model="scripted", input="hi", tool_choice="required")
            text_only = await client.chat.completions.create(
                model="scripted", messages=ask("hi"), modalities=["text"], tool_choice="none"
            )
    assert responses.value.body["param"] == "tool_choice"
    assert "needs tools" in responses.value.body["message"]
    assert text_only.choices[0].message.content == "Hello! How can I help?"


async def test_a_response_repeats_its_request(gateway_url: str) -> None:
    tools: list[Any] = [
        {"type": "function", "name": t["name"], "parameters": t["input_schema"]} for t in TOOLS
    ]
    asked: dict[str, Any] = {
        "model": "scripted",
        "input": "hi",
        "instructions": "Be brief.",
        "metadata": {"team": "wire"},
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "name": "get_time"},
        "tools": tools,
        "max_output_tokens": 50,
    }
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="x", max_retries=0
    ) as client:
        with trio.fail_after(10):
            whole = await client.responses.create(**asked)
            events = [e async for e in await client.responses.create(**asked, stream=True)]
    created = next(e for e in events if e.type == "response.created").response
    completed = next(e for e in events if e.type == "response.completed").response
    for response in (whole, created, completed):
        assert response.instructions == "Be brief."
        assert response.metadata == {"team": "wire"}
        assert response.parallel_tool_calls is False
        assert response.tool_choice.model_dump() == {"type": "function", "name": "get_time"}
        assert [t.name for t in response.tools] == ["get_weather", "get_time"]
        assert response.max_output_tokens == 50


async def test_responses_tools_through_the_gateway(gateway_url: str, neuron: NeuronHandle) -> None:
    tools: list[Any] = [
        {"type": "function", "name": t["name"], "parameters": t["input_schema"]} for t in TOOLS
    ]
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="x", max_retries=0
    ) as client:
        with trio.fail_after(10):
            async with client.responses.stream(
                model="scripted", input="What's the weather in Paris?", tools=tools
            ) as stream:
                first = await stream.get_final_response()
            call = first.output[1]
            answer = await client.responses.create(
                model="scripted",
                tools=tools,
                input=[
                    {"role": "user", "content": "What's the weather in Paris?"},
                    *[item.model_dump(exclude_none=True) for item in first.output],
                    {
                        "type": "function_call_output",
                        "call_id": call.call_id,
                        "output": "sunny, 21",
                    },
                ],
            )
    assert [item.type for item in first.output] == ["message", "function_call"]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    assert answer.output_text == "It is sunny and 21 °C in Paris."
    assert f"<|tool|>{call.call_id}: sunny, 21" in engine_model(neuron).prompts[-1]


# -- schemas no grammar can be built from: a 400 naming the route's own field -------------

#: An object schema whose ref resolves to nothing: no grammar holds an answer to it.
UNGRAMMATICAL = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}
GRAMMAR_REFUSED = "cannot build a grammar from the JSON schema"


async def test_a_schema_without_a_grammar_is_named_in_each_routes_terms(
    gateway_url: str,
) -> None:
    # The neuron builds the grammar; each route names the field as its request holds it.
    chat_tools = [
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["input_schema"]}},
        {"type": "function", "function": {"name": "broken", "parameters": UNGRAMMATICAL}},
    ]
    responses_tools = [{"type": "function", **t["function"]} for t in chat_tools]
    anthropic_tools = [TIME, {"name": "broken", "input_schema": UNGRAMMATICAL}]
    chat = {"model": "scripted", "messages": ask("hi"), "tools": chat_tools}
    responses = {"model": "scripted", "input": "hi", "tools": responses_tools}
    messages = {"model": "scripted", "max_tokens": 50, "messages": ask("hi")}
    json_schema = {"type": "json_schema", "schema": UNGRAMMATICAL}
    openai_refused: list[tuple[str, dict[str, Any], str]] = [
        ("chat/completions", chat | {"tool_choice": "required"}, "tools[1].function.parameters"),
        (
            "chat/completions",
            chat | {"tool_choice": {"type": "function", "function": {"name": "broken"}}},
            "tools[1].function.parameters",
        ),
        (
            "chat/completions",
            {
                "model": "scripted",
                "messages": ask("hi"),
                "response_format": {"type": "json_schema", "json_schema": json_schema},
            },
            "response_format.json_schema",
        ),
        ("responses", responses | {"tool_choice": "required"}, "tools[1].parameters"),
        (
            "responses",
            responses | {"tool_choice": {"type": "function", "name": "broken"}},
            "tools[1].parameters",
        ),
        (
            "responses",
            {"model": "scripted", "input": "hi", "text": {"format": json_schema | {"name": "x"}}},
            "text.format.schema",
        ),
    ]
    anthropic_refused: list[tuple[dict[str, Any], str]] = [
        (
            messages | {"tools": anthropic_tools, "tool_choice": {"type": "any"}},
            "tools.1.input_schema",
        ),
        (
            messages
            | {"tools": anthropic_tools, "tool_choice": {"type": "tool", "name": "broken"}},
            "tools.1.input_schema",
        ),
        (messages | {"output_config": {"format": json_schema}}, "output_config.format.schema"),
        (messages | {"output_format": json_schema}, "output_format.schema"),
    ]
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as http:
        with trio.fail_after(20):
            for route, body, param in openai_refused:
                for stream in (False, True):
                    answer = await http.post(f"/v1/{route}", json=body | {"stream": stream})
                    assert answer.status_code == 400, (route, body, answer.text)
                    error = answer.json()["error"]
                    assert error["param"] == param, (route, body, error)
                    assert error["message"].startswith(f"{param}: {GRAMMAR_REFUSED}"), error
                    assert param.startswith("tools") == ("of tool 'broken'" in error["message"])
            for body, field in anthropic_refused:
                for stream in (False, True):
                    answer = await http.post("/v1/messages", json=body | {"stream": stream})
                    assert answer.status_code == 400, (body, answer.text)
                    error = answer.json()["error"]
                    assert error["type"] == "invalid_request_error"
                    assert error["message"].startswith(f"{field}: {GRAMMAR_REFUSED}"), error
                    assert field.startswith("tools") == ("of tool 'broken'" in error["message"])
            # With tool_choice auto the model may answer in text: no grammar, no refusal.
            auto = await http.post("/v1/messages", json=messages | {"tools": anthropic_tools})
    assert auto.status_code == 200, auto.text


# -- a Claude Code-shaped turn ------------------------------------------------------------

CLAUDE_CODE_TOOLS = [
    "Agent",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "KillShell",
    "Skill",
    "SlashCommand",
    "AskUserQuestion",
    "EnterPlanMode",
    "ListMcpResourcesTool",
    "ReadMcpResourceTool",
    "TaskOutput",
    "TaskStop",
    "LSP",
    "ToolSearch",
]


def claude_code_tool(name: str) -> dict[str, Any]:
    """A tool shaped like Claude Code's: draft-07 schema, long description."""
    properties: dict[str, Any] = {
        "description": {"type": "string", "description": f"What this {name} call does."},
        "timeout": {"type": "number", "description": "Milliseconds, at most 600000."},
        "options": {
            "type": "object",
            "properties": {"mode": {"type": "string", "enum": ["fast", "thorough"]}},
            "additionalProperties": False,
        },
        "paths": {"type": "array", "items": {"type": "string"}},
    }
    if name == "Bash":
        properties["command"] = {"type": "string", "description": "The command to execute"}
    return {
        "name": name,
        "description": f"{name}: " + "Use this tool when the task calls for it. " * 12,
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": properties,
            "required": ["command"] if name == "Bash" else ["description"],
            "additionalProperties": False,
        },
    }


CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "x-api-key": "sk-ant-local",
    # As claude-cli 2.1.197 sent it (contrib/claude-code/README.md).
    "anthropic-beta": (
        "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14,"
        "thinking-token-count-2026-05-13,context-management-2025-06-27,"
        "prompt-caching-scope-2026-01-05,mid-conversation-system-2026-04-07,effort-2025-11-24"
    ),
    "anthropic-dangerous-direct-browser-access": "true",
    "x-app": "cli",
    "user-agent": "claude-cli/2.1.197 (external, sdk-cli)",
    "content-type": "application/json",
    "accept": "application/json",
}


def claude_code_body() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=sdk-cli;",
            },
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "You are an interactive CLI tool. " * 150,
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": [claude_code_tool(name) for name in CLAUDE_CODE_TOOLS],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"},
                    {
                        "type": "text",
                        "text": "Please list the files here.",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            },
            {"role": "system", "content": "The working directory is /work."},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {
            "user_id": json.dumps(
                {"device_id": "ab" * 32, "account_uuid": "", "session_id": "0f" * 16}
            )
        },
    }


def sse_events(raw: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) for each SSE frame."""
    events = []
    for frame in raw.split("\n\n"):
        if not frame.strip():
            continue
        name, data = None, []
        for line in frame.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        events.append((name, json.loads("\n".join(data))))
    return events


async def test_a_claude_code_shaped_turn(gateway_url: str, neuron: NeuronHandle) -> None:
    body = claude_code_body()
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as http:
        with trio.fail_after(10):
            response = await http.post(
                "/v1/messages?beta=true", json=body, headers=CLAUDE_CODE_HEADERS
            )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"]
    events = sse_events(response.text)
    assert all(name == data["type"] for name, data in events), "every frame names its event"
    check_block_order([attrs_of(data) for _, data in events])
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "Bash" and starts[1]["input"] == {}
    text = "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["index"] == 0
    )
    arguments = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == 1
    )
    assert text == "I will list them."
    assert json.loads(arguments) == {"command": "ls -la", "description": "List the files"}
    message_start = events[0][1]["message"]
    message_delta = events[-2][1]
    prompt = engine_model(neuron, "scripted-big").prompts[-1]
    assert message_start["usage"]["input_tokens"] == len(prompt.encode()) > 20_000
    # max_tokens was more than the context leaves: clamped, not refused.
    assert BIG_CTX - len(prompt.encode()) < body["max_tokens"]
    assert message_start["model"] == "scripted-big"
    assert message_delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert message_delta["usage"]["output_tokens"] > 0
    # What the model saw: the system blocks, all 24 tools, the reminder kept in place.
    assert prompt.startswith("<|system|># Tools\n")
    assert prompt.count('"type": "function"') == 24
    assert (
        "<|user|><system-reminder>Be careful.</system-reminder>\nPlease list the files here."
        "<|end|><|system|>The working directory is /work.<|end|><|assistant|>"
    ) in prompt
    assert "You are Claude Code, Anthropic's official CLI for Claude." in prompt


async def test_claude_code_shaped_turn_without_streaming(gateway_url: str) -> None:
    body = claude_code_body() | {"stream": False}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as http:
        with trio.fail_after(10):
            response = await http.post(
                "/v1/messages?beta=true", json=body, headers=CLAUDE_CODE_HEADERS
            )
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["stop_reason"] == "tool_use"
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][1]["input"] == {"command": "ls -la", "description": "List the files"}


# -- message threads: the SDKs' tool runners fall back to the whole history ---------------

THREADS_BETA = "message-threads-2026-08-12"
#: The 400 for a ``thread``, as the SDKs' tool runners recognise it (``error.details.error_code``).
THREAD_ERROR = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "thread is not supported: cortex keeps no conversation between requests; "
        "send the whole conversation in messages, without thread",
        "details": {"error_code": "thread_unsupported_request"},
    },
}


@anthropic.lib.tools.beta_async_tool
async def get_weather(city: str, unit: str = "celsius") -> str:
    """The weather in a city.

    Args:
      city: the city.
      unit: celsius or fahrenheit.
    """
    return "sunny, 21"


async def test_the_tool_runner_falls_back_from_a_thread_to_the_whole_history(
    gateway_url: str,
) -> None:
    # The SDK's tool runner threads by default: its first turn asks for a
    # thread, and on this 400 it sends that turn and the next without one.
    sent: list[tuple[str | None, dict[str, Any]]] = []
    answered: list[tuple[int, Any]] = []

    async def request(request: httpx2.Request) -> None:
        sent.append((request.headers.get("anthropic-beta"), json.loads(request.content)))

    async def response(response: httpx2.Response) -> None:
        await response.aread()
        answered.append((response.status_code, response.json()))

    hooks = {"request": [request], "response": [response]}
    with trio.fail_after(20):
        async with (
            httpx2.AsyncClient(event_hooks=hooks) as http,  # this SDK's httpx
            anthropic.AsyncAnthropic(
                base_url=gateway_url, api_key="x", max_retries=0, http_client=http
            ) as client,
        ):
            runner = client.beta.messages.tool_runner(
                model="scripted",
                max_tokens=200,
                tools=[get_weather],
                messages=ask("What's the weather in Paris?"),
            )
            replies = [message async for message in runner]
    assert [status for status, _ in answered] == [400, 200, 200]
    assert answered[0][1] == THREAD_ERROR
    (beta, first), (_, again), (_, after) = sent
    assert THREADS_BETA in (beta or "") and first["thread"] == {"type": "create"}
    assert "thread" not in again and again["messages"] == first["messages"]
    assert "thread" not in after and len(after["messages"]) == 3
    assert [reply.stop_reason for reply in replies] == ["tool_use", "end_turn"]
    assert replies[-1].content[0].text == "It is sunny and 21 °C in Paris."


async def test_a_thread_is_a_400_the_sdk_knows_before_anything_else(gateway_url: str) -> None:
    # A turn that continues a thread, as the SDK sends it: only the new
    # tool_result, without tools. The thread is what is wrong, not the result.
    body = {
        "model": "scripted",
        "max_tokens": 200,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21"}
                ],
            }
        ],
        "thread": {"type": "continue", "previous_message_id": "msg_0123456789abcdef01234567"},
    }
    headers = {"anthropic-beta": THREADS_BETA, "anthropic-version": "2023-06-01"}
    async with (
        httpx.AsyncClient(base_url=gateway_url, timeout=10) as http,
        anthropic.AsyncAnthropic(base_url=gateway_url, api_key="x", max_retries=0) as client,
    ):
        with trio.fail_after(10):
            continued = await http.post("/v1/messages?beta=true", json=body, headers=headers)
            counted = await http.post("/v1/messages/count_tokens", json=body, headers=headers)
            with pytest.raises(anthropic.BadRequestError) as created:
                await client.beta.messages.create(
                    model="scripted",
                    max_tokens=200,
                    messages=ask("hi"),
                    thread={"type": "create"},
                    betas=[THREADS_BETA],
                )
    assert continued.status_code == counted.status_code == 400
    assert continued.json() == counted.json() == THREAD_ERROR
    assert type(created.value).__name__ == "ThreadUnsupportedRequestError"
    assert created.value.body == THREAD_ERROR


#: The Node SDK's tool runner, run by node; the gateway's URL is its argument.
NODE_TOOL_RUNNER = """
const Anthropic = require('@anthropic-ai/sdk').default;
const { betaTool } = require('@anthropic-ai/sdk/helpers/beta/json-schema');
const statuses = [];
const fetchLogged = async (url, init) => {
  const response = await fetch(url, init);
  statuses.push(response.status);
  return response;
};
const client = new Anthropic({
  baseURL: process.argv[1], apiKey: 'x', maxRetries: 0, fetch: fetchLogged,
});
const weather = betaTool({
  name: 'get_weather',
  description: 'The weather in a city.',
  inputSchema: {
    type: 'object', properties: { city: { type: 'string' }, unit: { type: 'string' } },
  },
  run: async () => 'sunny, 21',
});
(async () => {
  const replies = [];
  const messages = [{ role: 'user', content: "What's the weather in Paris?" }];
  for await (const message of client.beta.messages.toolRunner({
    model: 'scripted', max_tokens: 200, tools: [weather], messages,
  })) replies.push([message.stop_reason, message.content]);
  console.log(JSON.stringify({ statuses, replies }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def node_sdk() -> str | None:
    """``node``, where it can load ``@anthropic-ai/sdk`` (as installed, or on ``NODE_PATH``)."""
    node = shutil.which("node")
    if node is None:
        return None
    found = subprocess.run(
        [node, "-e", "require.resolve('@anthropic-ai/sdk/helpers/beta/json-schema')"],
        capture_output=True,
        check=False,
    )
    return node if found.returncode == 0 else None


@pytest.mark.skipif(node_sdk() is None, reason="node with @anthropic-ai/sdk is not installed")
async def test_the_node_sdks_tool_runner_with_its_defaults(gateway_url: str) -> None:
    node = node_sdk()
    assert node is not None
    with trio.fail_after(30):
        done = await trio.run_process(
            [node, "-e", NODE_TOOL_RUNNER, gateway_url], capture_stdout=True, check=False
        )
    assert done.returncode == 0
    result = json.loads(done.stdout)
    # The thread it asks for first is refused; it carries on without one.
    assert result["statuses"] == [400, 200, 200]
    assert [stop for stop, _ in result["replies"]] == ["tool_use", "end_turn"]
    assert result["replies"][-1][1][0]["text"] == "It is sunny and 21 °C in Paris."


# -- follow-ups: an answer that calls a tool keeps its model for the result ----------------


async def follow_ups(gateway: GatewayHandle) -> dict[str, float]:
    """``cortex_follow_ups_expected`` and ``cortex_follow_ups_total`` by result, from /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(gateway.metrics_url + "/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cortex_follow_ups_expected":
                found["expected"] = sample.value
            elif sample.name == "cortex_follow_ups_total":
                found[sample.labels["result"]] = sample.value
    return found


Clients = tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]


@contextlib.asynccontextmanager
async def clients(gateway: GatewayHandle) -> AsyncIterator[Clients]:
    url = gateway.api_url
    async with (
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as claude,
    ):
        yield oai, claude


async def tool_turn(
    sdks: Clients, dialect: str, text: str
) -> tuple[bool, Callable[[], Awaitable[Any]]]:
    """One turn in ``dialect``: whether its answer called a tool, and the next turn (the
    same conversation with the tool's results) to send."""
    oai, claude = sdks
    tools: Any = [
        {"type": "function", "name": t["name"], "parameters": t["input_schema"]} for t in TOOLS
    ]
    if dialect.startswith("chat"):
        kwargs: dict[str, Any] = {"model": "scripted", "tools": OPENAI_TOOLS}
        if dialect == "chat-stream":
            async with oai.chat.completions.stream(messages=ask(text), **kwargs) as stream:
                completion = await stream.get_final_completion()
        else:
            completion = await oai.chat.completions.create(messages=ask(text), **kwargs)
        message = completion.choices[0].message
        results = [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny, 21"}
            for c in message.tool_calls or []
        ]
        history = [*ask(text), message.model_dump(exclude_none=True), *results]
        called = completion.choices[0].finish_reason == "tool_calls"
        return called, partial(oai.chat.completions.create, messages=history, **kwargs)
    if dialect.startswith("responses"):
        if dialect == "responses-stream":
            async with oai.responses.stream(model="scripted", input=text, tools=tools) as stream:
                response = await stream.get_final_response()
        else:
            response = await oai.responses.create(model="scripted", input=text, tools=tools)
        outputs = [
            {"type": "function_call_output", "call_id": item.call_id, "output": "sunny, 21"}
            for item in response.output
            if item.type == "function_call"
        ]
        items = [item.model_dump(exclude_none=True) for item in response.output]
        history = [{"role": "user", "content": text}, *items, *outputs]
        return bool(outputs), partial(
            oai.responses.create, model="scripted", tools=tools, input=history
        )
    kwargs = {"model": "scripted", "max_tokens": 200, "tools": TOOLS}
    if dialect == "messages-stream":
        _, reply = await stream_message(claude, messages=ask(text), **kwargs)
    else:
        reply = await claude.messages.create(messages=ask(text), **kwargs)
    content = [b.model_dump(exclude_none=True) for b in reply.content]
    results = [
        {"type": "tool_result", "tool_use_id": b.id, "content": "sunny, 21"}
        for b in reply.content
        if b.type == "tool_use"
    ]
    history = [
        *ask(text),
        {"role": "assistant", "content": content},
        {"role": "user", "content": results},
    ]
    called = reply.stop_reason == "tool_use"
    return called, partial(claude.messages.create, messages=history, **kwargs)


DIALECTS = ["chat", "chat-stream", "responses", "responses-stream", "messages", "messages-stream"]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_an_answer_that_calls_a_tool_expects_its_follow_up(
    gateway: GatewayHandle, dialect: str
) -> None:
    with trio.fail_after(20):
        async with clients(gateway) as sdks:
            called, follow_up = await tool_turn(sdks, dialect, "What's the weather in Paris?")
            before = await follow_ups(gateway)
            await follow_up()
            after = await follow_ups(gateway)
    assert called
    assert before["expected"] == 1 and before["kept"] == 0
    # The result came at once, the model still loaded where the call came from.
    assert after["expected"] == 0 and after["kept"] == 1
    assert after["evicted"] == after["late"] == after["expired"] == 0


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_an_answer_without_a_tool_call_expects_nothing(
    gateway: GatewayHandle, dialect: str
) -> None:
    with trio.fail_after(20):
        async with clients(gateway) as sdks:
            called, _ = await tool_turn(sdks, dialect, "count to five")
        found = await follow_ups(gateway)
    assert not called
    assert found == {"expected": 0, "kept": 0, "evicted": 0, "late": 0, "expired": 0}


async def test_a_streams_usage_agrees_from_start_to_end(tiny_model_path: pathlib.Path) -> None:
    # A real engine with a prompt cache: the second turn reads most of its prompt from it.
    models = ModelsFile(models=[CatalogModel(id="tiny", vram_mb=1)])
    history = ask("Tell me about the sea, the sky and the mountains in a few words.")
    kwargs: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "messages": history}
    with trio.fail_after(60):
        async with (
            running_neuron([("tiny", str(tiny_model_path))]) as neuron,
            running_gateway(neuron.url, models) as gateway,
            anthropic.AsyncAnthropic(base_url=gateway.api_url, api_key="x", max_retries=0) as c,
        ):
            await c.messages.create(**kwargs)
            events, final = await stream_message(c, **kwargs)
            whole = await c.messages.create(**kwargs)
    start = events[0].message.usage
    delta = events[-2].usage
    assert start.cache_read_input_tokens and start.cache_read_input_tokens > 0
    split = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    for key in split:
        assert getattr(start, key) == getattr(delta, key) == getattr(final.usage, key), key
        assert getattr(whole.usage, key) == getattr(final.usage, key), key
