"""Tools on the llama.cpp engine with a tiny random-weight GGUF.

Mostly constrained output, where only the grammar makes the output valid.

The model's weights are noise, so any structure in its output comes from the
llama.cpp grammar the neuron builds. Strings in the schemas are bounded
(``maxLength``): unbounded ones are valid too, but noise may fill them until
the token limit. A grammar that is complete leaves only end-of-generation
tokens, so generation ends by itself (finish_reason ``stop``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
import trio

from cortex.errors import ModelLoadError
from cortex.harness import LoadSpec, Placement
from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "unit", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 6}},
                "required": ["zone"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["Describe someone.", "Who?", "Any JSON please"]
#: Greedy, then sampled with fixed seeds.
SAMPLING = [{"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]


@pytest.fixture
async def neuron(tiny_model_path: Path):
    # The template writes the tools' JSON into the prompt, a byte a token:
    # more context than the model's trained 512.
    options = {"n_threads": 1, "n_ctx": 2048}
    async with running_neuron([("tiny", str(tiny_model_path))], options=options) as handle:
        for family in ("llama3", "mistral"):
            await handle.neuron.manager.load(
                LoadRequest(
                    model_id=f"tiny-{family}",
                    source=str(tiny_model_path),
                    options={**options, "tool_format": family},
                )
            )
        yield handle


@pytest.fixture
async def client(neuron):
    async with openai.AsyncOpenAI(
        base_url=neuron.url + "/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_json_schema_output_validates(client: openai.AsyncOpenAI) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    with trio.fail_after(60):
        for prompt in PROMPTS:
            for sampling in SAMPLING:
                reply = await client.chat.completions.create(
                    model="tiny",
                    messages=ask(prompt),
                    max_tokens=200,
                    response_format=response_format,
                    **sampling,
                )
                text = reply.choices[0].message.content
                jsonschema.validate(json.loads(text), PERSON)
                assert reply.choices[0].finish_reason == "stop", text


async def test_a_recursive_pydantic_schema_is_held_to(client: openai.AsyncOpenAI) -> None:
    # pydantic writes a self-referencing model as a root "$ref" beside its
    # "$defs": llama.cpp's converter left the refs inside those unresolved (a
    # 400, "cannot build a grammar").
    class Node(pydantic.BaseModel):
        label: str = pydantic.Field(max_length=8)
        children: list[Node] = pydantic.Field(default_factory=list, max_length=2)

    schema = Node.model_json_schema()
    assert "$ref" in schema and "$defs" in schema
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "node", "schema": schema},
    }
    finished = 0
    with trio.fail_after(60):
        for sampling in SAMPLING:
            reply = await client.chat.completions.create(
                model="tiny",
                messages=ask("A tree?"),
                max_tokens=300,
                response_format=response_format,
                **sampling,
            )
            # Nothing bounds the depth: noise may nest until the token limit.
            if reply.choices[0].finish_reason == "stop":
                Node.model_validate_json(reply.choices[0].message.content)
                finished += 1
    assert finished, "no sampling finished its tree within 300 tokens"


async def test_json_object_output_parses(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(60):
        for prompt in PROMPTS:
            reply = await client.chat.completions.create(
                model="tiny",
                messages=ask(prompt),
                max_tokens=200,
                temperature=0,
                response_format={"type": "json_object"},
            )
            assert isinstance(json.loads(reply.choices[0].message.content), dict)
            assert reply.choices[0].finish_reason == "stop"


async def test_unconstrained_output_is_not_json(client: openai.AsyncOpenAI) -> None:
    # The control: without a grammar the same model writes noise.
    with trio.fail_after(30):
        reply = await client.chat.completions.create(
            model="tiny", messages=ask(PROMPTS[0]), max_tokens=40, temperature=0
        )
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)


def check_call(call: Any, names: set[str]) -> None:
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", ["tiny", "tiny-llama3", "tiny-mistral"])
async def test_required_tool_choice_yields_a_call(
    client: openai.AsyncOpenAI, neuron: NeuronHandle, model: str
) -> None:
    # The ChatML test template says nothing (hermes by default); the others
    # come from the tool_format load option.
    family = {"tiny": None, "tiny-llama3": "llama3", "tiny-mistral": "mistral"}[model]
    assert neuron.neuron.manager.slots[model].model.tool_format == family
    with trio.fail_after(60):
        for prompt in PROMPTS:
            for sampling in SAMPLING:
                reply = await client.chat.completions.create(
                    model=model,
                    messages=ask(prompt),
                    tools=TOOLS,
                    tool_choice="required",
                    parallel_tool_calls=False,
                    max_tokens=200,
                    **sampling,
                )
                message = reply.choices[0].message
                assert reply.choices[0].finish_reason == "tool_calls", message
                assert not message.content
                [call] = message.tool_calls
                check_call(call, set(SCHEMAS))


async def test_named_tool_choice_streams_that_call(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(60):
        stream = await client.chat.completions.create(
            model="tiny",
            messages=ask("What time is it?"),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            temperature=0,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_time" and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_time"])
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_required_with_parallel_calls_parses(client: openai.AsyncOpenAI) -> None:
    # Noise may keep adding calls until the limit; each finished one is valid.
    with trio.fail_after(60):
        reply = await client.chat.completions.create(
            model="tiny",
            messages=ask(PROMPTS[1]),
            tools=TOOLS,
            tool_choice="required",
            max_tokens=200,
            temperature=0,
        )
    calls = reply.choices[0].message.tool_calls
    finished = calls if reply.choices[0].finish_reason == "tool_calls" else calls[:-1]
    assert finished
    for call in finished:
        check_call(call, set(SCHEMAS))


async def test_responses_json_schema(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(60):
        response = await client.responses.create(
            model="tiny",
            input=PROMPTS[0],
            max_output_tokens=200,
            temperature=0,
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)


# -- real weights: what a model that can answer does under the grammar ----------------

#: The tools and question of the new-user trial (SmolLM2, greedy).
CITY_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name, description in [
        ("get_weather", "Get the weather for a city"),
        ("get_time", "Get the local time in a city"),
    ]
]
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture
async def smollm2(smollm2_path: Path):
    options = {"n_threads": 1, "n_ctx": 2048}
    async with running_neuron([("smollm2", str(smollm2_path))], options=options) as handle:
        async with openai.AsyncOpenAI(
            base_url=handle.url + "/v1", api_key="unused", max_retries=0
        ) as client:
            yield client


async def test_required_tool_choice_lets_the_model_end_after_one_call(
    smollm2: openai.AsyncOpenAI,
) -> None:
    # SmolLM2 writes a newline after </tool_call>: a grammar in which a
    # newline led only to another block made it call again (twice here,
    # Gemma 3 until the token limit).
    with trio.fail_after(120):
        asked: Any = {
            "model": "smollm2",
            "messages": PARIS,
            "tools": CITY_TOOLS,
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 200,
        }
        reply = await smollm2.chat.completions.create(**asked)
        stream = await smollm2.chat.completions.create(**asked, stream=True)
        chunks = [chunk async for chunk in stream]
        response = await smollm2.responses.create(
            model="smollm2",
            input=PARIS[0]["content"],
            tools=[{"type": "function", **tool["function"]} for tool in CITY_TOOLS],
            tool_choice="required",
            temperature=0,
            max_output_tokens=200,
        )
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert {d.index for d in deltas} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [item] = [item for item in response.output if item.type == "function_call"]
    assert (item.name, json.loads(item.arguments)) == ("get_weather", {"city": "Paris"})


async def test_a_call_cut_short_never_leaks_markup(smollm2: openai.AsyncOpenAI) -> None:
    # The call takes about 25 tokens: these limits cut it inside the
    # opening markup, inside the name, and inside the arguments.
    kinds = set()
    for limit in (3, 6, 12, 16, 20):
        request: Any = dict(
            model="smollm2",
            messages=PARIS,
            tools=CITY_TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=limit,
        )
        with trio.fail_after(60):
            reply = await smollm2.chat.completions.create(**request)
            chunks = [
                c async for c in await smollm2.chat.completions.create(**request, stream=True)
            ]
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "length"
        assert not message.content, (limit, message.content)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == "", (limit, streamed)
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert calls == [(d.function.name, arguments) for d in deltas if d.function.name]
        assert chunks[-1].choices[0].finish_reason == "length"
        kinds.add("call" if calls else "none")
        for name, partial in calls:
            assert name == "get_weather" and '{ "city": "Paris" }'.startswith(partial)
    assert kinds == {"call", "none"}


# -- the engine's side: family detection, markup tokens, arguments for templates ----------

QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "Return calls as <tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}</tool_call>"
    "{%- endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def load_tiny(path: Path, **options: Any) -> Any:
    from cortex_llamacpp.model import load

    spec = LoadSpec(model_id="t", path=str(path), options={"n_threads": 1, **options})
    return load(spec, Placement())


def test_llamacpp_detects_the_family_and_decodes_arguments(tiny_model_factory) -> None:
    model = load_tiny(tiny_model_factory("qwen.gguf", chat_template=QWEN_LIKE))
    try:
        assert model.tool_format == "hermes"
        prompt = model.render_chat(
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
            ]
        )
        # `arguments | tojson` gets the object, not a doubly encoded string.
        assert '<tool_call>{"a": 1}</tool_call>' in prompt.text
    finally:
        model.unload()
    named = load_tiny(
        tiny_model_factory("plain.gguf", name="Meta-Llama-3.1-8B-Instruct", chat_template=None)
    )
    try:
        assert named.tool_format == "llama3"
    finally:
        named.unload()


def test_llamacpp_rejects_an_unknown_tool_format(tiny_model_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tool_format"):
        load_tiny(tiny_model_path, tool_format="xml")
