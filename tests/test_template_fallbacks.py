"""Nothing dropped in silence: real neuron and gateway, tiny GGUF models, official SDKs.

Two models have chat templates that cannot take everything a client sends:
``no-system`` (a Gemma-style Jinja template that raises on a system message
and ignores tools) and ``gemma-format`` (no template in the file, served
with llama-cpp-python's ``gemma`` chat format, which drops system messages
and ignores tools). The tests count prompt tokens (the neuron's
``/tokenize``, ``usage``, Anthropic's ``count_tokens``) to see that the
system text and the tools reach the prompt, and check that content no model
can read is refused with a 400 in the caller's dialect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
import trio

from cortex.chat_template import tools_text
from cortex.config import CatalogModel, ModelsFile
from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import running_gateway

#: Tools in a prompt take a token a byte here: more than the trained 512.
OPTIONS = {"n_threads": 1, "n_ctx": 2048}
ADAPTED = ["no-system", "gemma-format"]
SYSTEM = "Answer in French, in one short sentence."
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
PARTS = [
    IMAGE_URL,
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
]
ANTHROPIC_IMAGE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
}


@pytest.fixture
async def neuron(tiny_model_path: Path, no_system_model_path: Path, no_template_model_path: Path):
    models = [("no-system", str(no_system_model_path)), ("chatml", str(tiny_model_path))]
    async with running_neuron(models, options=OPTIONS) as handle:
        await handle.neuron.manager.load(
            LoadRequest(
                model_id="gemma-format",
                source=str(no_template_model_path),
                chat_format="gemma",
                options=OPTIONS,
            )
        )
        yield handle


@pytest.fixture
async def gateway_url(neuron: NeuronHandle):
    catalog = ModelsFile(
        models=[CatalogModel(id=m, vram_mb=1) for m in ("no-system", "gemma-format", "chatml")]
    )
    async with running_gateway(neuron.url, catalog) as gateway:
        yield gateway.api_url


async def count(
    http: httpx.AsyncClient, model: str, messages: list[Any], tools: list[Any] | None = None
) -> int:
    body: dict[str, Any] = {"model": model, "messages": messages}
    if tools is not None:
        body["tools"] = tools
    response = await http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# -- system messages --------------------------------------------------------------------


@pytest.mark.parametrize("model", ADAPTED)
async def test_system_text_reaches_the_prompt(
    http: httpx.AsyncClient, client: openai.AsyncOpenAI, model: str
) -> None:
    """Folded into the user turn as Gemma's own template does: system, blank line, user."""
    with_system = [{"role": "system", "content": SYSTEM}, *user("Hi")]
    with trio.fail_after(30):
        folded = await count(http, model, user(f"{SYSTEM}\n\nHi"))
        assert await count(http, model, with_system) == folded
        assert folded > await count(http, model, user("Hi")) + 20
        developer = [{"role": "developer", "content": SYSTEM}, *user("Hi")]
        assert await count(http, model, developer) == folded

        reply = await client.chat.completions.create(
            model=model, messages=with_system, max_tokens=1, temperature=0
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == folded
        response = await client.responses.create(
            model=model, instructions=SYSTEM, input="Hi", max_output_tokens=1
        )
        assert response.usage is not None and response.usage.input_tokens == folded


async def test_templates_with_a_system_role_keep_it(http: httpx.AsyncClient) -> None:
    with trio.fail_after(30):
        with_system = await count(http, "chatml", [{"role": "system", "content": "S"}, *user("Hi")])
        assert with_system != await count(http, "chatml", user("S\n\nHi"))


# -- tools ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ADAPTED)
async def test_tools_reach_the_prompt_in_hermes_form(http: httpx.AsyncClient, model: str) -> None:
    with trio.fail_after(30):
        documented = await count(http, model, user(f"{tools_text([WEATHER])}\n\nHi"))
        assert await count(http, model, user("Hi"), tools=[WEATHER]) == documented
        assert documented > await count(http, model, user("Hi")) + 300
        with_system = [{"role": "system", "content": SYSTEM}, *user("Hi")]
        both = f"{SYSTEM}\n\n{tools_text([WEATHER])}\n\nHi"
        assert await count(http, model, with_system, tools=[WEATHER]) == await count(
            http, model, user(both)
        )


@pytest.mark.parametrize("model", ADAPTED)
async def test_earlier_calls_and_results_reach_the_prompt(
    http: httpx.AsyncClient, model: str
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    turns = [
        *user("Weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 4 degrees."},
    ]
    as_text = [
        *user("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            "\n</tool_call>",
        },
        *user("<tool_response>\nRain, 4 degrees.\n</tool_response>"),
    ]
    with trio.fail_after(30):
        assert await count(http, model, turns) == await count(http, model, as_text)


async def test_tool_call_is_read_back_in_hermes_form(client: openai.AsyncOpenAI) -> None:
    """A forced call, in the Hermes markup the fallback asks for, comes back as a tool call."""
    with trio.fail_after(60):
        reply = await client.chat.completions.create(
            model="no-system",
            messages=user("Weather in Oslo?"),
            tools=[WEATHER],
            tool_choice="required",
            # One call: with several allowed, noise may keep adding more.
            parallel_tool_calls=False,
            max_tokens=200,
            temperature=0,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


# -- content no model can read ----------------------------------------------------------


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p["type"])
async def test_non_text_parts_get_a_400_naming_them(
    client: openai.AsyncOpenAI, gateway_url: str, part: dict[str, Any]
) -> None:
    messages: Any = [
        {"role": "system", "content": "Describe it."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
    ]
    message = (
        f"messages[1].content[1]: content block type {part['type']!r} "
        "is not supported by model 'chatml'"
    )
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key="unused", max_retries=0
    ) as via_gateway:
        for sdk in (client, via_gateway):
            with trio.fail_after(30), pytest.raises(openai.BadRequestError) as refused:
                await sdk.chat.completions.create(model="chatml", messages=messages, max_tokens=4)
            assert refused.value.status_code == 400
            assert refused.value.body == {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages[1].content[1]",
                "code": None,
            }


async def test_responses_input_image_gets_a_400(client: openai.AsyncOpenAI) -> None:
    content: Any = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
    ]
    with trio.fail_after(30), pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="chatml", input=[{"role": "user", "content": content}], max_output_tokens=4
        )
    assert refused.value.body["param"] == "input[0].content[1]"
    assert (
        "content block type 'input_image' is not supported by model 'chatml'"
        in (refused.value.body["message"])
    )


# -- through the gateway's Anthropic route ----------------------------------------------


@pytest.fixture
async def claude(gateway_url: str):
    async with anthropic.AsyncAnthropic(base_url=gateway_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.mark.parametrize(
    ("content", "where", "kind"),
    [
        ([{"type": "text", "text": "What is this?"}, ANTHROPIC_IMAGE], "content.1", "image"),
        (
            [{"type": "search_result", "source": "s", "title": "t", "content": []}],
            "content.0",
            "search_result",
        ),
    ],
)
async def test_anthropic_blocks_that_are_not_text_get_a_400(
    claude: anthropic.AsyncAnthropic, content: list[Any], where: str, kind: str
) -> None:
    messages: Any = [{"role": "user", "content": content}]
    expected = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"messages.0.{where}: content block type {kind!r} "
            "is not supported by model 'no-system'",
        },
    }
    with trio.fail_after(30):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.create(model="no-system", max_tokens=4, messages=messages)
        assert refused.value.body == expected
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.count_tokens(model="no-system", messages=messages)
        assert refused.value.body == expected


async def test_anthropic_image_in_a_tool_result_gets_a_400(
    claude: anthropic.AsyncAnthropic,
) -> None:
    messages: Any = [
        {"role": "user", "content": "Take a screenshot."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [ANTHROPIC_IMAGE]}
            ],
        },
    ]
    tools: Any = [{"name": "shot", "input_schema": {"type": "object"}}]
    with trio.fail_after(30), pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(
            model="no-system", max_tokens=4, messages=messages, tools=tools
        )
    assert refused.value.body["error"]["message"] == (
        "messages.2.content.0.content.0: content block type 'image' "
        "is not supported by model 'no-system'"
    )


@pytest.mark.parametrize("model", ADAPTED)
async def test_anthropic_system_and_tools_reach_the_prompt(
    claude: anthropic.AsyncAnthropic, http: httpx.AsyncClient, model: str
) -> None:
    tool: Any = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": WEATHER_SCHEMA,
    }
    messages: Any = user("Hi")
    with trio.fail_after(60):
        folded = await count(http, model, user(f"{SYSTEM}\n\nHi"))
        counted = await claude.messages.count_tokens(model=model, system=SYSTEM, messages=messages)
        assert counted.input_tokens == folded
        reply = await claude.messages.create(
            model=model,
            system=[{"type": "text", "text": SYSTEM}],
            messages=messages,
            max_tokens=1,
            extra_body={"temperature": 0},
        )
        assert reply.usage.input_tokens == folded
        with_tools = await claude.messages.count_tokens(
            model=model, system=SYSTEM, messages=messages, tools=[tool]
        )
        assert with_tools.input_tokens > folded + 300
