"""A final assistant turn to continue (a prefill): real neuron and gateway, tiny GGUF, SDKs.

Anthropic's API continues a final assistant turn; OpenAI's finishes it, and
vLLM's ``continue_final_message: true`` asks for Anthropic's behaviour. The
gateway translates the one into the other. The tiny model's ChatML template
is known, so each test compares the tokens the engine was handed with the
tokens of the prompt text it should have been: the conversation with the
generation prompt, then the prefill, and no end of turn after it. The
answers are noise (random weights); ``test_real_weights.py`` shows a real
model continuing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import trio

from cortex.config import CatalogModel, ModelsFile
from cortex.neuron.app import NeuronHandle
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import running_gateway

ASK = "Count from 1 to 10 separated by commas."
PREFILL = "1, 2, 3,"
CONVERSATION: Any = [
    {"role": "user", "content": ASK},
    {"role": "assistant", "content": PREFILL},
]
SYSTEM = "Answer briefly."
CONTINUED = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    f"<|im_start|>user\n{ASK}<|im_end|>\n"
    f"<|im_start|>assistant\n{PREFILL}"
)
#: What OpenAI's dialect renders without the flag: the turn is finished.
FINISHED = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    f"<|im_start|>user\n{ASK}<|im_end|>\n"
    f"<|im_start|>assistant\n{PREFILL}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CONTINUE: Any = {"continue_final_message": True}


class Served:
    def __init__(self, neuron: NeuronHandle, gateway_url: str) -> None:
        self.neuron = neuron
        self.gateway_url = gateway_url
        self.model = neuron.neuron.manager.slots["chatml"].model
        #: The prompt tokens of every generation, as the engine got them.
        self.prompts: list[list[int]] = []

    def spy(self, monkeypatch: pytest.MonkeyPatch) -> None:
        generate = self.model.generate

        def recorded(tokens: list[int], sampling: Any) -> Any:
            self.prompts.append(list(tokens))
            return generate(tokens, sampling)

        monkeypatch.setattr(self.model, "generate", recorded)

    def tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text)


@pytest.fixture
async def served(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    options = {"n_threads": 1, "n_ctx": 512}
    async with running_neuron([("chatml", str(tiny_model_path))], options=options) as neuron:
        catalog = ModelsFile(models=[CatalogModel(id="chatml", vram_mb=1)])
        async with running_gateway(neuron.url, catalog) as gateway:
            served = Served(neuron, gateway.api_url)
            served.spy(monkeypatch)
            yield served


@asynccontextmanager
async def anthropic_client(served: Served) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=served.gateway_url, api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


@asynccontextmanager
async def openai_client(served: Served) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=served.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def ask(**extra: Any) -> dict[str, Any]:
    return {
        "model": "chatml",
        "system": SYSTEM,
        "messages": CONVERSATION,
        "max_tokens": 4,
        "extra_body": {"temperature": 0},
        **extra,
    }


# -- what the engine is handed ----------------------------------------------------------


async def test_anthropic_prefill_is_continued_whole_and_streamed(served: Served) -> None:
    """The prompt ends with the prefill, no end of turn; usage and count_tokens count it."""
    expected = served.tokens(CONTINUED)
    with trio.fail_after(30):
        async with anthropic_client(served) as client:
            whole = await client.messages.create(**ask())
            async with client.messages.stream(**ask()) as stream:
                events = [event.type async for event in stream]
                streamed = await stream.get_final_message()
            counted = await client.messages.count_tokens(
                model="chatml", system=SYSTEM, messages=CONVERSATION
            )
    assert served.prompts == [expected, expected]
    assert counted.input_tokens == len(expected)
    for message in (whole, streamed):
        usage = message.usage
        assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == len(expected)
        assert message.stop_reason in ("max_tokens", "end_turn")
    assert [b.model_dump(include={"type", "text"}) for b in streamed.content] == [
        b.model_dump(include={"type", "text"}) for b in whole.content
    ]
    assert events[0] == "message_start" and events[-1] == "message_stop"


async def test_a_prefill_with_tools_offered_renders_them_before_it(served: Served) -> None:
    """``tool_choice`` auto: the tools reach the prompt; the prefill still ends it."""
    with trio.fail_after(30):
        async with anthropic_client(served) as client:
            await client.messages.create(**ask(tools=[WEATHER]))
            counted = await client.messages.count_tokens(
                model="chatml", system=SYSTEM, messages=CONVERSATION, tools=[WEATHER]
            )
    # The gateway's OpenAI form of the tool, as the template writes it (tojson).
    tool = {
        "type": "function",
        "function": {
            "name": WEATHER["name"],
            "parameters": WEATHER["input_schema"],
            "description": WEATHER["description"],
        },
    }
    tools = f"<|im_start|>system\n# Tools\n{json.dumps(tool)}\n<|im_end|>\n"
    assert served.prompts == [served.tokens(tools + CONTINUED)]
    assert counted.input_tokens == len(served.prompts[0])


async def test_openai_continues_only_when_asked(served: Served) -> None:
    """vLLM's ``continue_final_message``; without it the final assistant turn is finished."""
    messages = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    with trio.fail_after(30):
        async with openai_client(served) as client:
            for extra in ({}, CONTINUE, {**CONTINUE, "add_generation_prompt": False}):
                await client.chat.completions.create(
                    model="chatml", messages=messages, max_tokens=2, extra_body=extra
                )
            chunks = await client.chat.completions.create(
                model="chatml",
                messages=messages,
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=CONTINUE,
            )
            usage = [chunk.usage async for chunk in chunks if chunk.usage][-1]
    finished, continued = served.tokens(FINISHED), served.tokens(CONTINUED)
    assert served.prompts == [finished, continued, continued, continued]
    assert usage.prompt_tokens == len(continued)


# -- what cannot be continued -----------------------------------------------------------


def _with_final(content: Any) -> list[Any]:
    return [{"role": "user", "content": ASK}, {"role": "assistant", "content": content}]


ANTHROPIC_REFUSED = [
    pytest.param(
        {"messages": _with_final("1, 2, 3, ")},
        "messages.1.content: final assistant content cannot end with trailing whitespace",
        id="trailing-space",
    ),
    pytest.param(
        {"messages": _with_final([{"type": "text", "text": "Sure:\n"}])},
        "messages.1.content: final assistant content cannot end with trailing whitespace",
        id="trailing-newline-in-a-block",
    ),
    pytest.param(
        {
            "messages": _with_final(
                [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
                ]
            ),
            "tools": [WEATHER],
        },
        "messages.1.content.1: a final assistant turn is a prefill",
        id="tool-use",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": {"type": "any"}},
        "tool_choice: type 'any' (a forced tool call) cannot be combined with a final "
        "assistant turn to continue (a prefill)",
        id="forced-tool",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}},
        "tool_choice: type 'tool' (a forced tool call) cannot be combined",
        id="named-tool",
    ),
    pytest.param(
        {
            "extra_body": {
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}
            }
        },
        "output_config.format: structured output cannot be combined",
        id="structured-output",
    ),
]


@pytest.mark.parametrize(("change", "message"), ANTHROPIC_REFUSED)
async def test_anthropic_refuses_what_cannot_be_continued(
    served: Served, change: dict[str, Any], message: str
) -> None:
    with trio.fail_after(30):
        async with anthropic_client(served) as client:
            with pytest.raises(anthropic.BadRequestError) as caught:
                await client.messages.create(**{**ask(), **change})
            if "tool_choice" not in change and "extra_body" not in change:
                with pytest.raises(anthropic.BadRequestError) as counted:
                    await client.messages.count_tokens(
                        model="chatml", messages=change["messages"], tools=change.get("tools", [])
                    )
                assert counted.value.body == caught.value.body
    error = caught.value.body
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message), error
    assert served.prompts == []


CALL: Any = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ],
}
TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
OPENAI_REFUSED = [
    pytest.param({"messages": CONVERSATION[:1]}, "continue_final_message", id="last-is-user"),
    pytest.param(
        {"messages": [*CONVERSATION[:1], CALL], "tools": [TOOL]},
        "messages[1].tool_calls",
        id="tool-calls",
    ),
    pytest.param({"tools": [TOOL], "tool_choice": "required"}, "tool_choice", id="required"),
    pytest.param(
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        "tool_choice",
        id="named",
    ),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format", id="json"),
]


@pytest.mark.parametrize(("change", "param"), OPENAI_REFUSED)
async def test_openai_refuses_what_cannot_be_continued(
    served: Served, change: dict[str, Any], param: str
) -> None:
    body = {"model": "chatml", "messages": CONVERSATION, "max_tokens": 2, **change}
    with trio.fail_after(30):
        async with openai_client(served) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(**body, extra_body=CONTINUE)
            # Without the flag each is a request like any other, but a
            # final turn of calls without their results (OpenAI refuses it).
            if "tool_calls" in param:
                with pytest.raises(openai.BadRequestError) as unanswered:
                    await client.chat.completions.create(**body)
                assert "did not have response messages" in unanswered.value.message
            else:
                await client.chat.completions.create(**body)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert len(served.prompts) == (0 if "tool_calls" in param else 1)
