import json

import anthropic
import httpx2
import pytest

from cortex.errors import InvalidRequest
from cortex.wire import sse
from cortex.wire.anthropic import parse_count_tokens_request, parse_messages_request
from cortex.wire.openai import Usage, chat_chunk, chat_completion, parse_chat_request, usage_chunk
from cortex.wire.translate import AnthropicStream, anthropic_to_openai, openai_to_anthropic


def _to_openai(**fields):
    body = {"model": "claude", "max_tokens": 64, **fields}
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    out = anthropic_to_openai(parse_messages_request(body))
    # Whatever the gateway sends on must pass the neuron's own parser.
    parse_chat_request(out)
    return out


def _client(body: bytes | dict, *, stream: bool = False) -> anthropic.Anthropic:
    # This anthropic SDK runs on httpx2, not httpx.
    def handler(request: httpx2.Request) -> httpx2.Response:
        if stream:
            return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=body)

    return anthropic.Anthropic(
        api_key="x",
        base_url="http://t",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


# -- requests -----------------------------------------------------------------


def test_system_string_becomes_leading_system_message():
    out = _to_openai(system="be terse")
    assert out["messages"] == [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "hi"},
    ]
    assert out["model"] == "claude"
    assert out["max_tokens"] == 64


def test_system_blocks_joined_cache_control_ignored():
    out = _to_openai(
        system=[
            {"type": "text", "text": "one"},
            {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}},
        ]
    )
    assert out["messages"][0] == {"role": "system", "content": "one\ntwo"}


def test_mid_conversation_system_kept_in_place():
    out = _to_openai(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
            {"role": "user", "content": "c"},
        ]
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "system", "user"]
    assert out["messages"][2]["content"] == "reminder"


def test_text_blocks_become_content():
    out = _to_openai(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "z"}]},
        ]
    )
    assert out["messages"] == [
        {"role": "user", "content": "x\ny"},
        {"role": "assistant", "content": "z"},
    ]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QQ"}}
PDF = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}}


def _refused(**fields) -> InvalidRequest:
    body = {"model": "claude", "max_tokens": 64, **fields}
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest) as info:
        anthropic_to_openai(parse_messages_request(body), model="tiny")
    return info.value


@pytest.mark.parametrize(
    ("fields", "where", "kind"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, IMAGE]}]},
            "messages.0.content.1",
            "image",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "search_result", "x": 1}]},
                ]
            },
            "messages.1.content.0",
            "search_result",
        ),
        (
            {"system": [{"type": "text", "text": "s"}, {"type": "container_upload"}]},
            "system.1",
            "container_upload",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": [{"type": "new_kind_of_block"}]},
                ]
            },
            "messages.1.content.0",
            "new_kind_of_block",
        ),
    ],
)
def test_blocks_that_are_not_text_are_refused_by_name(fields, where, kind):
    """Images and unknown blocks are a 400 naming them, never dropped in silence."""
    error = _refused(**fields)
    assert error.message == (
        f"{where}: content block type {kind!r} is not supported by model 'tiny'"
    )
    assert error.param == where


#: The tools the conversations below call.
TOOLS = [{"name": name, "input_schema": {"type": "object"}} for name in ("Bash", "Read", "f")]
RESULTS = [
    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "a.py"},
    {"type": "tool_result", "tool_use_id": "toolu_b", "content": "x"},
]


def _tool_conversation(user_turn):
    return [
        {"role": "user", "content": "list files"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Running two."},
                {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {"cmd": "ls"}},
                {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {}},
            ],
        },
        {"role": "user", "content": user_turn},
    ]


def test_tool_use_becomes_tool_calls_with_json_arguments():
    out = _to_openai(messages=_tool_conversation(RESULTS), tools=TOOLS)
    assistant = out["messages"][1]
    assert assistant == {
        "role": "assistant",
        "content": "Running two.",
        "tool_calls": [
            {
                "id": "toolu_a",
                "type": "function",
                "function": {"name": "Bash", "arguments": '{"cmd": "ls"}'},
            },
            {"id": "toolu_b", "type": "function", "function": {"name": "Read", "arguments": "{}"}},
        ],
    }
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"cmd": "ls"}


def test_tool_use_only_assistant_has_null_content():
    out = _to_openai(
        messages=[
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ],
        tools=TOOLS,
    )
    assert out["messages"][1]["content"] is None
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": ""}
    assert len(out["messages"]) == 3


def test_tool_results_come_right_after_the_call_before_user_text():
    out = _to_openai(
        messages=_tool_conversation(
            [
                {"type": "text", "text": "here you go"},
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "a.py\nb.py"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": [
                        {"type": "text", "text": "line1"},
                        {"type": "text", "text": "line2"},
                    ],
                },
            ]
        ),
        tools=TOOLS,
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "tool", "user"]
    assert out["messages"][2] == {
        "role": "tool",
        "tool_call_id": "toolu_a",
        "content": "a.py\nb.py",
    }
    assert out["messages"][3] == {
        "role": "tool",
        "tool_call_id": "toolu_b",
        "content": "line1\nline2",
    }
    assert out["messages"][4] == {"role": "user", "content": "here you go"}


def test_tool_result_error_is_prefixed():
    out = _to_openai(
        messages=_tool_conversation(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "content": "no such file",
                    "is_error": True,
                },
                {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True},
            ]
        ),
        tools=TOOLS,
    )
    assert out["messages"][2]["content"] == "Error: no such file"
    assert out["messages"][3]["content"] == "Error"


def test_images_in_tool_results_are_refused():
    error = _refused(
        messages=_tool_conversation(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "content": [{"type": "text", "text": "screenshot"}, IMAGE],
                },
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "x"},
            ]
        ),
        tools=TOOLS,
    )
    assert error.param == "messages.2.content.0.content.1"
    assert "content block type 'image' is not supported by model 'tiny'" in error.message


def test_tool_results_stay_next_to_their_call_across_a_system_message():
    messages = _tool_conversation(
        [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "1"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "2"},
            {"type": "text", "text": "next"},
        ]
    )
    messages.insert(2, {"role": "system", "content": "reminder"})
    out = _to_openai(messages=messages, tools=TOOLS)
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "tool", "tool", "system", "user"]
    assert [m.get("tool_call_id") for m in out["messages"][2:4]] == ["toolu_a", "toolu_b"]


def test_thinking_blocks_dropped():
    out = _to_openai(
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "redacted_thinking", "data": "x"},
                    {"type": "text", "text": "answer"},
                ],
            },
        ]
    )
    assert out["messages"][1] == {"role": "assistant", "content": "answer"}


def test_stop_sequences_and_sampling_only_when_present():
    out = _to_openai(stop_sequences=["END", "###"], temperature=0.2, top_k=30)
    assert out["stop"] == ["END", "###"]
    assert out["temperature"] == 0.2 and out["top_k"] == 30
    assert "top_p" not in out
    bare = _to_openai()
    assert not {"stop", "temperature", "top_p", "top_k", "tools", "tool_choice"} & bare.keys()


def test_tools_become_function_tools():
    schema = {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}
    out = _to_openai(
        tools=[
            {"name": "Bash", "description": "Run", "input_schema": schema},
            {"name": "Noop", "input_schema": {"type": "object"}},
        ]
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "Bash", "description": "Run", "parameters": schema},
        },
        {
            "type": "function",
            "function": {"name": "Noop", "parameters": {"type": "object"}},
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}}),
    ],
)
def test_tool_choice(choice, expected):
    out = _to_openai(
        tools=[{"name": "Bash", "input_schema": {"type": "object"}}], tool_choice=choice
    )
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


def test_disable_parallel_tool_use():
    out = _to_openai(
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert out["parallel_tool_calls"] is False


def test_stream_asks_for_usage_and_model_override():
    body = {
        "model": "sonnet",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    out = anthropic_to_openai(parse_messages_request(body), model="Qwen/Qwen3-8B")
    assert out["model"] == "Qwen/Qwen3-8B"
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    chat = parse_chat_request(out)
    assert chat.include_usage is True
    assert "stream_options" not in _to_openai()
    assert _to_openai()["stream"] is False


def test_metadata_user_id_becomes_user():
    assert _to_openai(metadata={"user_id": '{"a": 1}'})["user"] == '{"a": 1}'


def test_count_tokens_request_translates_prompt_parts_only():
    req = parse_count_tokens_request(
        {
            "model": "m",
            "system": "s",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        }
    )
    out = anthropic_to_openai(req)
    assert out == {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object"}},
            }
        ],
    }


# -- answers ------------------------------------------------------------------


def _completion(content="Hi", finish_reason="stop", tool_calls=None, stop_sequence=None):
    return chat_completion(
        id="chatcmpl-1",
        created=1,
        model="qwen",
        content=content,
        finish_reason=finish_reason,
        usage=Usage(11, 7),
        tool_calls=tool_calls,
        stop_sequence=stop_sequence,
    )


def test_text_answer():
    msg = openai_to_anthropic(_completion(), model="claude", message_id="msg_1")
    assert msg == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 11,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 7,
        },
    }
    result = _client(msg).messages.create(model="claude", max_tokens=5, messages=[])
    assert result.content[0].text == "Hi"
    assert result.usage.output_tokens == 7
    assert openai_to_anthropic(_completion(), model="c")["id"].startswith("msg_")


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "reason", "sequence"),
    [
        ("stop", None, "end_turn", None),
        ("stop", "END", "stop_sequence", "END"),
        ("length", None, "max_tokens", None),
        ("tool_calls", None, "end_turn", None),
        ("content_filter", None, "refusal", None),
    ],
)
def test_stop_reason_mapping(finish, stop_sequence, reason, sequence):
    msg = openai_to_anthropic(
        _completion(finish_reason=finish, stop_sequence=stop_sequence), model="c"
    )
    assert (msg["stop_reason"], msg["stop_sequence"]) == (reason, sequence)


def test_tool_call_answer():
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "Bash", "arguments": '{"cmd": "ls"}'},
        },
        {"type": "function", "function": {"name": "Read", "arguments": ""}},
        {
            "id": "call_3",
            "type": "function",
            "function": {"name": "Edit", "arguments": '{"path": '},
        },
    ]
    msg = openai_to_anthropic(
        _completion(content="", finish_reason="tool_calls", tool_calls=calls), model="c"
    )
    assert msg["stop_reason"] == "tool_use"
    assert [b["type"] for b in msg["content"]] == ["tool_use"] * 3  # empty text omitted
    first, second, third = msg["content"]
    assert (first["id"], first["name"], first["input"]) == ("call_1", "Bash", {"cmd": "ls"})
    assert second["id"].startswith("toolu_") and second["input"] == {}
    assert third["input"] == {}  # cut before the value: nothing complete
    result = _client(msg).messages.create(model="c", max_tokens=5, messages=[])
    assert result.content[0].input == {"cmd": "ls"}
    assert result.stop_reason == "tool_use"


def test_text_kept_beside_tool_calls():
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]
    msg = openai_to_anthropic(
        _completion(content="Let me look.", finish_reason="tool_calls", tool_calls=calls), model="c"
    )
    assert msg["content"][0] == {"type": "text", "text": "Let me look."}
    # Valid JSON that is not an object is no tool input.
    assert msg["content"][1]["input"] == {}


def test_an_empty_answer_has_no_blocks_whole_and_streamed():
    for content in (None, ""):
        msg = openai_to_anthropic(_completion(content=content), model="c")
        assert msg["content"] == []
    streamed = _final(_run([_chunk({"role": "assistant", "content": ""}, finish_reason="stop")]))
    assert streamed.content == []
    assert _client(msg).messages.create(model="c", max_tokens=5, messages=[]).content == []


# -- streams ------------------------------------------------------------------


def _chunk(delta=None, finish_reason=None, stop_sequence=None):
    return chat_chunk(
        id="chatcmpl-s",
        created=1,
        model="qwen",
        delta=delta or {},
        finish_reason=finish_reason,
        stop_sequence=stop_sequence,
        include_usage=True,
    )


def _usage(prompt=12, completion=5):
    return usage_chunk(id="chatcmpl-s", created=1, model="qwen", usage=Usage(prompt, completion))


def _tool_delta(index, *, id=None, name=None, arguments=None):
    call = {"index": index, "function": {}}
    if id is not None:
        call.update(id=id, type="function")
        call["function"]["name"] = name
    if arguments is not None:
        call["function"]["arguments"] = arguments
    return {"tool_calls": [call]}


def _run(chunks, input_tokens=12):
    stream = AnthropicStream(message_id="msg_s", model="claude", input_tokens=input_tokens)
    events = []  # message_start comes with the first chunk's events
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    return events


def _encode(events) -> bytes:
    return b"".join(sse.encode(payload, event=name) for name, payload in events)


def _final(events):
    with _client(_encode(events), stream=True).messages.stream(
        model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        return stream.get_final_message()


def test_text_stream_events():
    events = _run(
        [
            _chunk({"role": "assistant", "content": "Hel"}),
            _chunk({"content": "lo"}),
            _chunk({}, finish_reason="stop"),
            _usage(),
        ]
    )
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(payload["type"] == name for name, payload in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {
        "input_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[5][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 5,
        },
    }
    final = _final(events)
    assert final.content[0].text == "Hello"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 5)


def test_stream_without_a_finish_reason_ends_with_an_error():
    # The chat stream stopped before saying why: cut short, not an end_turn.
    stream = AnthropicStream(message_id="m", model="c", input_tokens=1)
    stream.start()
    stream.feed(_chunk({"role": "assistant", "content": "Hel"}))
    assert not stream.complete
    assert stream.finish() == [
        (
            "error",
            {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "the neuron's stream ended before its answer did (no finish_reason)",
                },
            },
        )
    ]


def test_message_delta_waits_for_finish():
    stream = AnthropicStream(message_id="m", model="c", input_tokens=1)
    stream.start()
    events = stream.feed(_chunk({"content": "x"}, finish_reason="stop"))
    events += stream.feed(_usage())
    assert "message_delta" not in [name for name, _ in events]


def test_tool_call_fragments_stream():
    chunks = [
        _chunk({"role": "assistant", "content": "Checking "}),
        _chunk({"content": "both."}),
        _chunk(_tool_delta(0, id="call_a", name="Bash", arguments="")),
        _chunk(_tool_delta(0, arguments='{"cmd"')),
        _chunk(_tool_delta(0, arguments=': "ls -la"}')),
        _chunk(_tool_delta(1, id="call_b", name="Read")),
        _chunk(_tool_delta(1, arguments='{"path": "a.py",')),
        _chunk(_tool_delta(1, arguments=' "limit": 10}')),
        _chunk({}, finish_reason="tool_calls"),
        _usage(40, 30),
    ]
    events = _run(chunks, input_tokens=40)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",  # text 0
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool 1
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool 2
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "Bash", "input": {}},
    }
    assert events[6][1] == {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"cmd"'},
    }
    assert events[9][1]["content_block"]["name"] == "Read"
    # Nothing dropped: the fragments add up to the arguments.
    joined = "".join(p["delta"]["partial_json"] for _, p in events[10:12])
    assert json.loads(joined) == {"path": "a.py", "limit": 10}
    assert events[13][1]["delta"]["stop_reason"] == "tool_use"

    final = _final(events)
    assert final.content[0].text == "Checking both."
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == (
        "call_a",
        "Bash",
        {"cmd": "ls -la"},
    )
    assert final.content[2].input == {"path": "a.py", "limit": 10}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (40, 30)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (['{ "city'], {}),
        (['{"city": "Paris", "unit": "cel'], {"city": "Paris"}),
        (['{"city": "Paris", ', '"days": [1, 2'], {"city": "Paris", "days": [1, 2]}),
        (['{"n": 12'], {"n": 12}),
        (['{"a": {"b": tr'], {"a": {}}),
    ],
)
def test_a_cut_tool_call_has_the_same_input_whole_and_streamed(pieces, expected):
    # max_tokens ended the call mid-arguments: both read it as the SDK reads a stream.
    arguments = "".join(pieces)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    whole = openai_to_anthropic(
        _completion(content=None, finish_reason="length", tool_calls=[call]), model="c"
    )
    streamed = _final(
        _run(
            [
                _chunk(_tool_delta(0, id="c1", name="f", arguments="")),
                *(_chunk(_tool_delta(0, arguments=piece)) for piece in pieces),
                _chunk({}, finish_reason="length"),
                _usage(),
            ]
        )
    )
    assert whole["content"][-1]["input"] == expected
    assert streamed.content[-1].input == expected
    assert whole["stop_reason"] == streamed.stop_reason == "max_tokens"


def test_tool_call_in_first_chunk_with_all_arguments():
    events = _run(
        [
            _chunk(_tool_delta(0, id="c1", name="f", arguments='{"a": 1}')),
            _chunk({}, finish_reason="tool_calls"),
            _usage(),
        ]
    )
    final = _final(events)
    assert [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == {"a": 1}


def test_tool_call_without_id_gets_one():
    events = _run(
        [_chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]})]
    )
    block = events[1][1]["content_block"]
    assert block["id"].startswith("toolu_") and block["name"] == "f"


def test_tool_calls_finish_without_tool_block_is_end_turn():
    events = _run(
        [_chunk({"content": "no tools"}), _chunk({}, finish_reason="tool_calls"), _usage()]
    )
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_stop_sequence_stream():
    events = _run(
        [_chunk({"content": "a"}), _chunk({}, finish_reason="stop", stop_sequence="END"), _usage()]
    )
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    final = _final(events)
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


def test_length_stream():
    events = _run([_chunk({"content": "a"}), _chunk({}, finish_reason="length"), _usage(3, 1)])
    final = _final(events)
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 1


def test_usage_on_the_finish_chunk_is_used_too():
    last = _chunk({}, finish_reason="stop")
    last["usage"] = Usage(8, 2).to_openai()
    events = _run([_chunk({"content": "a"}), last])
    assert events[-2][1]["usage"] == {
        "input_tokens": 8,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 2,
    }


def test_without_usage_chunk_output_tokens_counts_chunks():
    events = _run(
        [_chunk({"content": "a"}), _chunk({"content": "b"}), _chunk({}, finish_reason="stop")]
    )
    assert events[-2][1]["usage"] == {
        "input_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 2,
    }


def test_message_start_has_the_split_of_the_first_chunk_prompt_usage():
    first = _chunk({"role": "assistant", "content": "Hi"})
    first["prompt_usage"] = {"prompt_tokens": 184, "prompt_tokens_details": {"cached_tokens": 183}}
    final_usage = {
        "prompt_tokens": 184,
        "completion_tokens": 2,
        "total_tokens": 186,
        "prompt_tokens_details": {"cached_tokens": 183},
    }
    usage = usage_chunk(id="chatcmpl-s", created=1, model="qwen", usage=Usage(184, 2, 183))
    assert usage["usage"] == final_usage
    # The gateway's own count (input_tokens=184) gives way to the neuron's split.
    events = _run([first, _chunk({}, finish_reason="stop"), usage], input_tokens=184)
    start = events[0][1]["message"]["usage"]
    delta = events[-2][1]["usage"]
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]
    assert start == {
        "input_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 183,
        "output_tokens": 0,
    }
    assert {k: v for k, v in delta.items() if k != "output_tokens"} == {
        k: v for k, v in start.items() if k != "output_tokens"
    }
    assert delta["output_tokens"] == 2


def test_message_start_waits_for_the_first_chunk():
    stream = AnthropicStream(message_id="m", model="c", input_tokens=5)
    events = stream.feed(_chunk({"content": "a"}))
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta"]
    assert stream.start() == []
    failed = AnthropicStream(message_id="m", model="c", input_tokens=5).error("gone")
    assert [n for n, _ in failed] == ["message_start", "error"]


def test_empty_stream_invents_nothing():
    events = _run([_chunk({}, finish_reason="stop"), _usage(4, 0)])
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    final = _final(events)
    assert final.content == []
    assert final.stop_reason == "end_turn"


def test_ping_and_error_events():
    stream = AnthropicStream(message_id="m", model="c", input_tokens=1)
    events = stream.start() + stream.ping() + stream.feed(_chunk({"content": "part"}))
    events += stream.feed({"error": {"message": "neuron died", "type": "server_error"}})
    assert events[1] == ("ping", {"type": "ping"})
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "neuron died"}},
    )
    assert stream.error("busy", status=529)[0][1]["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.APIStatusError, match="neuron died"):
        _final(events)


def _kept_alive(chunks, times=2):
    """A stream kept alive ``times`` before its chunks (a long prompt): its events."""
    stream = AnthropicStream(message_id="msg_s", model="claude", input_tokens=12)
    events = []
    for _ in range(times):
        events += stream.keep_alive()
    for chunk in chunks:
        events += stream.feed(chunk)
    return events + stream.finish()


def test_keep_alive_is_an_empty_text_delta_the_answer_goes_on_in():
    # Claude Code's watchdog counts a ping as silence: an empty delta is not.
    events = _kept_alive(
        [
            _chunk({"role": "assistant", "content": "Hel"}),
            _chunk({"content": "lo"}),
            _chunk({}, finish_reason="stop"),
            _usage(),
        ]
    )
    names = [name for name, _ in events]
    assert names[:4] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]
    assert "ping" not in names
    assert names.count("content_block_start") == 1  # the answer's text is in that block
    assert [p["index"] for n, p in events if n == "content_block_delta"] == [0, 0, 0, 0]
    final = _final(events)
    assert [(b.type, b.text) for b in final.content] == [("text", "Hello")]


def test_keep_alive_before_a_tool_call_leaves_an_empty_text_block_clients_send_back():
    events = _kept_alive(
        [
            _chunk(_tool_delta(0, id="call_a", name="Bash", arguments='{"cmd": "ls"}')),
            _chunk({}, finish_reason="tool_calls"),
            _usage(),
        ]
    )
    final = _final(events)
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "" and final.content[1].input == {"cmd": "ls"}
    assert final.stop_reason == "tool_use"
    # The next turn, as Claude Code sends it, is a request like any other.
    request = parse_messages_request(
        {
            "model": "c",
            "max_tokens": 5,
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "list"},
                {"role": "assistant", "content": [b.model_dump() for b in final.content]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_a", "content": "a.py"}
                    ],
                },
            ],
        }
    )
    assistant = anthropic_to_openai(request)["messages"][1]
    assert assistant["tool_calls"][0]["function"]["name"] == "Bash"


def test_keep_alive_after_the_answer_began_is_a_ping():
    stream = AnthropicStream(message_id="m", model="c", input_tokens=1)
    stream.feed(_chunk(_tool_delta(0, id="call_a", name="Bash", arguments="{}")))
    assert stream.keep_alive() == [("ping", {"type": "ping"})]


def test_text_document_becomes_text_other_documents_refused():
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "D"}}
    out = _to_openai(messages=[{"role": "user", "content": [doc, {"type": "text", "text": "sum"}]}])
    assert out["messages"][0]["content"] == "D\nsum"
    error = _refused(messages=[{"role": "user", "content": [{"type": "text", "text": "sum"}, PDF]}])
    assert error.param == "messages.0.content.1.source"
    assert "document source type 'base64' is not supported by model 'tiny'" in error.message


def test_cached_prompt_tokens_become_cache_reads():
    # Anthropic's input_tokens is the uncached part; nothing is a paid cache write.
    body = openai_to_anthropic(
        chat_completion(
            id="c",
            created=1,
            model="qwen",
            content="Hi",
            finish_reason="stop",
            usage=Usage(100, 7, cached_tokens=64),
        ),
        model="claude",
        message_id="msg_1",
    )
    assert body["usage"] == {
        "input_tokens": 36,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 7,
    }
    usage = _client(body).messages.create(model="claude", max_tokens=5, messages=[]).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens) == (36, 64)


def test_streamed_cache_reads_arrive_in_message_delta():
    usage = usage_chunk(
        id="chatcmpl-s", created=1, model="qwen", usage=Usage(100, 1, cached_tokens=90)
    )
    events = _run(
        [_chunk({"content": "a"}), _chunk({}, finish_reason="stop"), usage], input_tokens=100
    )
    assert events[0][1]["message"]["usage"]["input_tokens"] == 100
    assert events[-2][1]["usage"]["cache_read_input_tokens"] == 90
    final = _final(events)
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (10, 90)
    assert final.usage.cache_creation_input_tokens == 0
