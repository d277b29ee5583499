"""Tool calls end to end: the openai SDK against a neuron with a scripted engine.

The engine (``tests/plugins/cortex_scripted.py``) is installed the way any
third-party engine is (see ``tests/scripted_helpers.py``), for these tests only.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import httpx
import openai
import pytest
import trio

from cortex.neuron.app import NeuronHandle
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import engine_model, install_scripted_engine, write_script

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]

PARIS_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
SCRIPT = {
    "rules": [
        {
            "when": "weather in Paris",
            "tools": True,
            "reply": f"Let me check.\n<tool_call>\n{PARIS_CALL}\n</tool_call>",
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
        {
            "when": "find Ada",
            "reply": '<tool_call>\n{"name": "crm.find_customer", "arguments": {"name": "Ada"}}'
            "\n</tool_call>",
        },
        {"when": "customer 42", "reply": "Ada is customer 42."},
        {"when": "broken", "reply": '<tool_call>{"name": oops}</tool_call> sorry'},
    ],
}
MISTRAL_SCRIPT = {
    "rules": [
        {
            "when": "weather in Paris",
            "reply": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "arguments": {"city": "Paris"}}]',
        }
    ]
}
LLAMA3_SCRIPT = {
    "rules": [
        {
            "when": "weather in Paris",
            "reply": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        },
        {"when": "What is JSON", "reply": '{"answer": "a data format"}'},
    ]
}


@pytest.fixture
async def neuron(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    install_scripted_engine(tmp_path, monkeypatch)
    async with running_neuron(
        [("scripted", write_script(tmp_path, "hermes", SCRIPT))], options={}
    ) as handle:
        for model_id, script, family in (
            ("scripted-mistral", MISTRAL_SCRIPT, "mistral"),
            ("scripted-llama3", LLAMA3_SCRIPT, "llama3"),
        ):
            await handle.neuron.manager.load(
                LoadRequest(
                    model_id=model_id,
                    source=write_script(tmp_path, family, script),
                    options={"tool_format": family},
                )
            )
        yield handle


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def collect_stream(stream: Any) -> tuple[str | None, list[dict[str, Any]], list[Any]]:
    """Content, tool calls (accumulated from deltas, checking their shape) and chunks."""
    chunks = [chunk async for chunk in stream]
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content.append(delta.content)
        for piece in delta.tool_calls or ():
            if piece.index not in calls:
                # The first fragment of a call names it.
                assert piece.id and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
            calls[piece.index]["arguments"] += piece.function.arguments or ""
    return "".join(content) or None, [calls[i] for i in sorted(calls)], chunks


# -- chat completions -------------------------------------------------------------------


async def test_engine_comes_from_the_entry_point(neuron: NeuronHandle) -> None:
    assert "scripted" in {h.name for h in neuron.neuron.discovery.harnesses}
    assert engine_model(neuron).harness == "scripted"
    assert engine_model(neuron).tool_format == "hermes"  # detected from its template
    assert engine_model(neuron, "scripted-mistral").tool_format == "mistral"  # the load option


async def test_call_with_text_before_it(client: openai.AsyncOpenAI, neuron: NeuronHandle) -> None:
    with trio.fail_after(10):
        reply = await client.chat.completions.create(
            model="scripted", messages=ask("What's the weather in Paris?"), tools=TOOLS
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # The tools reached the model through its chat template.
    assert '"name": "get_weather"' in engine_model(neuron).prompts[-1]


async def test_call_streams_as_tool_call_deltas(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="scripted",
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
        content, calls, chunks = await collect_stream(stream)
    assert content == "Let me check."
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    # The arguments arrive in several fragments, not as one blob at the end.
    fragments = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(fragments) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    for chunk in chunks:
        for choice in chunk.choices:
            assert "<tool_call>" not in (choice.delta.content or "")
            assert "tool_call>" not in (choice.delta.content or "")


async def test_sdk_stream_helper_accumulates_the_call(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        async with client.chat.completions.stream(
            model="scripted", messages=ask("What's the weather in Paris?"), tools=TOOLS
        ) as stream:
            final = await stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments)["city"] == "Paris"
    assert final.choices[0].finish_reason == "tool_calls"


async def test_parallel_calls(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        whole = await client.chat.completions.create(
            model="scripted", messages=ask("Paris and Rome, please"), tools=TOOLS
        )
        stream = await client.chat.completions.create(
            model="scripted", messages=ask("Paris and Rome, please"), tools=TOOLS, stream=True
        )
        content, calls, _ = await collect_stream(stream)
    message = whole.choices[0].message
    assert message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"city": "Rome"}),
    ]
    assert len({c.id for c in message.tool_calls}) == 2
    assert content is None
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls
    ]


async def test_three_turns_render_calls_and_results(
    client: openai.AsyncOpenAI, neuron: NeuronHandle
) -> None:
    messages: list[Any] = ask("What's the weather in Paris?")
    with trio.fail_after(10):
        first = await client.chat.completions.create(
            model="scripted", messages=messages, tools=TOOLS
        )
        call = first.choices[0].message.tool_calls[0]
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        second = await client.chat.completions.create(
            model="scripted", messages=messages, tools=TOOLS
        )
    assert second.choices[0].message.content == "It is sunny and 21 °C in Paris."
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason == "stop"
    prompt = engine_model(neuron).prompts[-1]
    rendered_call = f"<|assistant|>Let me check.<tool_call>{json.dumps(json.loads(PARIS_CALL))}"
    assert rendered_call in prompt
    assert prompt.index(rendered_call) < prompt.index(f"<|tool|>{call.id}: sunny, 21 C")


async def test_tool_choice_none_hides_the_tools(
    client: openai.AsyncOpenAI, neuron: NeuronHandle
) -> None:
    with trio.fail_after(10):
        reply = await client.chat.completions.create(
            model="scripted",
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
            tool_choice="none",
        )
    assert reply.choices[0].message.content == "I cannot look that up."
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    assert "# Tools" not in engine_model(neuron).prompts[-1]
    assert engine_model(neuron).grammars[-1] is None


async def test_forced_calls_constrain_with_a_grammar(
    client: openai.AsyncOpenAI, neuron: NeuronHandle
) -> None:
    model = engine_model(neuron)
    with trio.fail_after(10):
        await client.chat.completions.create(
            model="scripted",
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
            tool_choice="required",
        )
        required = model.grammars[-1]
        await client.chat.completions.create(
            model="scripted",
            messages=ask("What's the weather in Paris?"),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        named = model.grammars[-1]
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(
                model="scripted",
                messages=ask("hi"),
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        await client.chat.completions.create(model="scripted", messages=ask("hi"), tools=TOOLS)
        auto = model.grammars[-1]
    assert "<tool_call>" in required and "get_weather" in required and "get_time" in required
    assert "get_time" in named and "get_weather" not in named
    assert unknown.value.body["param"] == "tool_choice"
    assert auto is None


async def test_malformed_call_falls_back_to_text(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        reply = await client.chat.completions.create(
            model="scripted", messages=ask("broken"), tools=TOOLS
        )
        stream = await client.chat.completions.create(
            model="scripted", messages=ask("broken"), tools=TOOLS, stream=True
        )
        content, calls, _ = await collect_stream(stream)
    expected = '<tool_call>{"name": oops}</tool_call> sorry'
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    assert (content, calls) == (expected, [])


@pytest.mark.parametrize("model", ["scripted-mistral", "scripted-llama3"])
async def test_other_families(client: openai.AsyncOpenAI, model: str) -> None:
    with trio.fail_after(10):
        whole = await client.chat.completions.create(
            model=model, messages=ask("What's the weather in Paris?"), tools=TOOLS
        )
        stream = await client.chat.completions.create(
            model=model, messages=ask("What's the weather in Paris?"), tools=TOOLS, stream=True
        )
        content, calls, _ = await collect_stream(stream)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.content is None and content is None
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert [c["arguments"] for c in calls] == [c.function.arguments for c in message.tool_calls]


async def test_llama3_json_answer_is_not_a_call(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        reply = await client.chat.completions.create(
            model="scripted-llama3", messages=ask("What is JSON?"), tools=TOOLS
        )
    assert reply.choices[0].message.content == '{"answer": "a data format"}'
    assert reply.choices[0].finish_reason == "stop"


async def test_without_tools_markup_is_plain_text(client: openai.AsyncOpenAI) -> None:
    # No tools in the request: the plain path, which parses nothing.
    with trio.fail_after(10):
        reply = await client.chat.completions.create(
            model="scripted", messages=ask("Paris and Rome")
        )
    assert reply.choices[0].message.content.startswith("<tool_call>")
    assert reply.choices[0].finish_reason == "stop"


# -- responses --------------------------------------------------------------------------

RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
    for t in TOOLS
]


async def test_responses_function_calls(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(10):
        whole = await client.responses.create(
            model="scripted", input="What's the weather in Paris?", tools=RESPONSES_TOOLS
        )
        async with client.responses.stream(
            model="scripted", input="What's the weather in Paris?", tools=RESPONSES_TOOLS
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    for response in (whole, final):
        assert [item.type for item in response.output] == ["message", "function_call"]
        assert response.output_text == "Let me check."
        call = response.output[1]
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    kinds = [e.type for e in events]
    assert kinds.count("response.function_call_arguments.delta") > 1
    assert kinds.index("response.output_text.done") < kinds.index("response.output_item.added", 3)
    assert kinds[-1] == "response.completed"


async def test_responses_parallel_and_round_trip(
    client: openai.AsyncOpenAI, neuron: NeuronHandle
) -> None:
    with trio.fail_after(10):
        parallel = await client.responses.create(
            model="scripted", input="Paris and Rome", tools=RESPONSES_TOOLS, stream=False
        )
        assert [(i.type, i.name) for i in parallel.output] == [
            ("function_call", "get_weather"),
            ("function_call", "get_time"),
        ]
        first = await client.responses.create(
            model="scripted", input="What's the weather in Paris?", tools=RESPONSES_TOOLS
        )
        call = first.output[1]
        answer = await client.responses.create(
            model="scripted",
            tools=RESPONSES_TOOLS,
            input=[
                {"role": "user", "content": "What's the weather in Paris?"},
                *[item.model_dump(exclude_none=True) for item in first.output],
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"},
            ],
        )
    assert answer.output_text == "It is sunny and 21 °C in Paris."
    assert [item.type for item in answer.output] == ["message"]
    assert f"<|tool|>{call.call_id}: sunny, 21" in engine_model(neuron).prompts[-1]


async def test_responses_max_tool_calls_caps_the_calls_and_is_echoed(
    client: openai.AsyncOpenAI,
) -> None:
    with trio.fail_after(10):
        whole = await client.responses.create(
            model="scripted", input="Paris and Rome", tools=RESPONSES_TOOLS, max_tool_calls=1
        )
        async with client.responses.stream(
            model="scripted", input="Paris and Rome", tools=RESPONSES_TOOLS, max_tool_calls=1
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        for response in (whole, final):
            assert [(i.type, i.name) for i in response.output] == [("function_call", "get_weather")]
            assert json.loads(response.output[0].arguments) == {"city": "Paris"}
            assert response.max_tool_calls == 1
        assert [e.type for e in events].count("response.output_item.added") == 1
        # 0: no call at all, so the model is not shown the tools.
        none = await client.responses.create(
            model="scripted",
            input="What's the weather in Paris?",
            tools=RESPONSES_TOOLS,
            max_tool_calls=0,
        )
        assert none.output_text == "I cannot look that up." and none.max_tool_calls == 0
        with pytest.raises(openai.BadRequestError) as forced:
            await client.responses.create(
                model="scripted",
                input="Paris and Rome",
                tools=RESPONSES_TOOLS,
                tool_choice="required",
                max_tool_calls=0,
            )
        assert forced.value.body["param"] == "max_tool_calls"


FIND_CUSTOMER = {
    "type": "function",
    "name": "find_customer",
    "description": "Look a customer up by name.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
}
CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database.",
    "tools": [FIND_CUSTOMER],
}


async def test_responses_namespace_tools_are_called_as_the_namespace_s(
    client: openai.AsyncOpenAI, neuron: NeuronHandle
) -> None:
    tools: list[Any] = [*RESPONSES_TOOLS, CRM]
    with trio.fail_after(10):
        whole = await client.responses.create(model="scripted", input="find Ada", tools=tools)
        async with client.responses.stream(
            model="scripted", input="find Ada", tools=tools
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    # The model sees the function as <namespace>.<name>, described by both.
    shown = json.loads(engine_model(neuron).prompts[-1].splitlines()[3])
    assert shown["function"]["name"] == "crm.find_customer"
    assert shown["function"]["description"] == (
        "The customer database.\n\nLook a customer up by name."
    )
    for response in (whole, final):
        [call] = response.output
        assert (call.type, call.namespace, call.name) == ("function_call", "crm", "find_customer")
        assert json.loads(call.arguments) == {"name": "Ada"}
    items = [
        e.item
        for e in events
        if e.type in ("response.output_item.added", "response.output_item.done")
    ]
    assert [(i.namespace, i.name) for i in items] == [("crm", "find_customer")] * 2
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].name == "find_customer"

    # The next turn: the call (with its namespace) and its output pair up.
    with trio.fail_after(10):
        answer = await client.responses.create(
            model="scripted",
            tools=tools,
            input=[
                {"role": "user", "content": "find Ada"},
                final.output[0].model_dump(exclude_none=True),
                {
                    "type": "function_call_output",
                    "call_id": final.output[0].call_id,
                    "output": "customer 42",
                },
            ],
        )
    assert answer.output_text == "Ada is customer 42."
    prompt = engine_model(neuron).prompts[-1]
    assert '<tool_call>{"name": "crm.find_customer", "arguments": {"name": "Ada"}}' in prompt
    assert f"<|tool|>{final.output[0].call_id}: customer 42" in prompt


HOSTED = "hosted tools run at OpenAI; cortex serves only function tools"


@pytest.mark.parametrize(
    "tools, items, param, message",
    [
        (
            [*RESPONSES_TOOLS, {"type": "web_search", "external_web_access": False}],
            [],
            "tools[2]",
            f"tools[2]: tool type 'web_search' is not supported ({HOSTED}: remove it; "
            "for Codex: -c web_search='\"disabled\"')",
        ),
        (
            [{"type": "file_search", "vector_store_ids": ["vs_1"]}],
            [],
            "tools[0]",
            f"tools[0]: tool type 'file_search' is not supported ({HOSTED}: remove it)",
        ),
        (
            [{**CRM, "tools": [FIND_CUSTOMER, {"type": "custom", "name": "patch"}]}],
            [],
            "tools[0].tools[1]",
            "tools[0].tools[1]: tool type 'custom' is not supported (custom tools take "
            "free-form text, which a local model's tool-call markup cannot carry; cortex "
            "serves only function tools, in a namespace too: remove it, or declare it as a "
            "function tool with a JSON schema)",
        ),
        (
            [CRM, {**CRM, "description": "Another one."}],
            [],
            "tools[1].tools[0].name",
            "tools[1].tools[0]: the model would see this tool as 'crm.find_customer', as it "
            "sees tools[0].tools[0]: give each tool its own name",
        ),
        (
            [{**FIND_CUSTOMER, "name": "crm.find_customer"}, CRM],
            [],
            "tools[1].tools[0].name",
            "as it sees tools[0]",
        ),
        (
            [*RESPONSES_TOOLS, RESPONSES_TOOLS[0]],
            [],
            "tools[2].name",
            "tools[2]: the model would see this tool as 'get_weather', as it sees tools[0]",
        ),
        (
            RESPONSES_TOOLS,
            [{"type": "web_search_call", "id": "ws_1", "status": "completed"}],
            "input[1]",
            "input[1]: input item type 'web_search_call' is not supported (it records a call "
            "of a hosted tool, and hosted tools run at OpenAI; cortex serves messages, "
            "function_call, function_call_output and reasoning items: leave it out of input)",
        ),
        (
            RESPONSES_TOOLS,
            [{"type": "local_shell_call", "call_id": "c1", "status": "completed"}],
            "input[1]",
            "input[1]: input item type 'local_shell_call' is not supported (it records a call "
            "of an OpenAI built-in tool",
        ),
        (
            RESPONSES_TOOLS,
            [{"type": "custom_tool_call", "call_id": "c1", "name": "patch", "input": "x"}],
            "input[1]",
            "type 'custom_tool_call' is not supported (custom tools take free-form text",
        ),
        (
            RESPONSES_TOOLS,
            [{"type": "compaction", "encrypted_content": "gAAA"}],
            "input[1]",
            "input[1]: input item type 'compaction' is not supported (it holds history that "
            "OpenAI compacted and encrypted, which only OpenAI can read; cortex serves "
            "messages, function_call, function_call_output and reasoning items: start a new "
            "conversation, or compact it on the client)",
        ),
    ],
)
async def test_responses_refuses_what_it_cannot_serve_saying_what_to_do(
    client: openai.AsyncOpenAI,
    tools: list[Any],
    items: list[dict[str, Any]],
    param: str,
    message: str,
) -> None:
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model="scripted", input=[*ask("find Ada"), *items], tools=tools
            )
    assert refused.value.body["param"] == param
    assert message in refused.value.body["message"]


def called(*ids: str) -> dict[str, Any]:
    """An assistant turn that called get_weather once per id."""
    calls = [
        {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


UNANSWERED = "An assistant message with 'tool_calls' must be followed by tool messages"


@pytest.mark.parametrize(
    "messages, param, match",
    [
        (
            [*ask("hi"), result("call_x")],
            "messages[1].role",
            "messages with role 'tool' must be a response to a preceding message with 'tool_calls'",
        ),
        (
            [*ask("hi"), called("call_a"), result("call_a"), *ask("and?"), result("call_a")],
            "messages[4].role",
            "must be a response to a preceding message",
        ),
        (
            [*ask("hi"), called("call_a"), result("call_b")],
            "messages[2].tool_call_id",
            "'tool_call_id' of \"call_b\" not found in 'tool_calls' of previous message",
        ),
        (
            [*ask("hi"), called("call_a", "call_b"), result("call_a"), *ask("and?")],
            "messages[3].role",
            f"{UNANSWERED}.*did not have response messages: call_b$",
        ),
        ([*ask("hi"), called("call_a")], "messages", "response messages: call_a$"),
    ],
)
async def test_chat_tool_results_must_answer_the_calls_before_them(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], param: str, match: str
) -> None:
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError, match=match) as refused:
            await client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    assert refused.value.body["param"] == param


@pytest.mark.parametrize(
    "items, match",
    [
        (
            [{"type": "function_call_output", "call_id": "call_x", "output": "sunny"}],
            "No tool call found for function call output with call_id call_x.",
        ),
        (
            [
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ""},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c1", "output": "again"},
            ],
            "No tool call found for function call output with call_id c1.",
        ),
        (
            [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ""}],
            "No tool output found for function call c1.",
        ),
    ],
)
async def test_responses_function_call_outputs_must_answer_a_call(
    client: openai.AsyncOpenAI, items: list[dict[str, Any]], match: str
) -> None:
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError, match=match) as refused:
            await client.responses.create(
                model="scripted", input=[*ask("weather in Paris"), *items], tools=RESPONSES_TOOLS
            )
    assert refused.value.body["param"] == "input"


async def test_response_format_reaches_the_engine_as_a_grammar(
    neuron: NeuronHandle, client: openai.AsyncOpenAI
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with httpx.AsyncClient(base_url=neuron.url, timeout=10) as http:
        with trio.fail_after(10):
            await client.chat.completions.create(
                model="scripted",
                messages=ask("hi"),
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": schema},
                },
            )
            grammar = engine_model(neuron).grammars[-1]
            bad = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "scripted",
                    "messages": ask("hi"),
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}},
                    },
                },
            )
    assert grammar is not None and '"\\"n\\""' in grammar
    assert bad.status_code == 400
