import httpx
import openai
import pytest

from cortex.errors import InvalidRequest
from cortex.wire import sse
from cortex.wire.openai import Usage, parse_chat_request
from cortex.wire.responses import (
    RelayedResponse,
    ResponsesStream,
    parse_responses_request,
    response_object,
)


def _client(body: bytes | dict, *, stream: bool = False) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        if stream:
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=body)

    return openai.OpenAI(
        api_key="x",
        base_url="http://t/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def _encode(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(sse.encode(payload, event=name) for name, payload in events)


# -- parsing ------------------------------------------------------------------


def test_string_input_with_instructions():
    req = parse_responses_request(
        {
            "model": "m",
            "input": "hi",
            "instructions": "be brief",
            "max_output_tokens": 50,
            "temperature": 0.3,
            "top_p": 0.9,
            "stream": True,
            "store": False,
        }
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert req.max_output_tokens == 50
    assert (req.sampling.temperature, req.sampling.top_p) == (0.3, 0.9)
    assert req.stream is True and req.store is False


def test_item_list_with_parts_and_function_calls():
    req = parse_responses_request(
        {
            "model": "m",
            "input": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "weather in "},
                        {"type": "input_text", "text": "Oslo?"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
                },
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "rain"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "noon"}],
                },
                {"role": "user", "content": [{"type": "input_text", "text": "and this?"}]},
            ],
        }
    )
    call = lambda i, n: {  # noqa: E731
        "id": i,
        "type": "function",
        "function": {"name": n, "arguments": "{}"},
    }
    assert req.messages == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call("c1", "weather"), call("c2", "time")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "user", "content": "and this?"},
    ]
    # The converted conversation is a valid chat request.
    parse_chat_request({"model": "m", "messages": req.messages})


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
        {"type": "input_file", "file_id": "file_1"},
        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}},
    ],
)
def test_non_text_parts_are_refused_by_name(part):
    content = [{"type": "input_text", "text": "and this?"}, part]
    body = {"model": "tiny", "input": [{"role": "user", "content": content}]}
    with pytest.raises(InvalidRequest) as info:
        parse_responses_request(body)
    assert info.value.param == "input[0].content[1]"
    assert info.value.message == (
        f"input[0].content[1]: content block type {part['type']!r} is not supported by model 'tiny'"
    )


def test_function_call_without_preceding_text_opens_an_assistant_turn():
    req = parse_responses_request(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "go"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "done"},
            ],
        }
    )
    assert req.messages[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
        ],
    }


def test_tools_and_tool_choice_converted_to_chat_shape():
    req = parse_responses_request(
        {
            "model": "m",
            "input": "x",
            "tools": [
                {
                    "type": "function",
                    "name": "get_weather",
                    "description": "Weather now",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                }
            ],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
        }
    )
    assert req.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": True,
            },
        }
    ]
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert req.parallel_tool_calls is False
    tools = [{"type": "function", "name": "f"}]
    required = {"model": "m", "input": "x", "tool_choice": "required", "tools": tools}
    assert parse_responses_request(required).tool_choice == "required"
    with pytest.raises(InvalidRequest, match="needs tools"):
        parse_responses_request({**required, "tools": None})


def test_text_format_becomes_response_format():
    fmt = {"type": "json_schema", "name": "r", "schema": {"type": "object"}, "strict": True}
    req = parse_responses_request({"model": "m", "input": "x", "text": {"format": fmt}})
    assert req.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": True},
    }
    req = parse_responses_request(
        {"model": "m", "input": "x", "text": {"format": {"type": "text"}}}
    )
    assert req.response_format == {"type": "text"}


def test_namespace_tools_are_shown_as_namespace_dot_function():
    ns = {
        "type": "namespace",
        "name": "crm",
        "description": "The customer database.",
        "tools": [{"type": "function", "name": "find", "parameters": {"type": "object"}}],
    }
    req = parse_responses_request(
        {
            "model": "m",
            "tools": [ns],
            "tool_choice": {"type": "function", "name": "find", "namespace": "crm"},
            "input": [
                {"role": "user", "content": "find Ada"},
                {"type": "function_call", "call_id": "c1", "namespace": "crm", "name": "find"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
        }
    )
    assert req.tools == [
        {
            "type": "function",
            "function": {
                "name": "crm.find",
                "parameters": {"type": "object"},
                "description": "The customer database.",
            },
        }
    ]
    assert req.tool_choice == {"type": "function", "function": {"name": "crm.find"}}
    assert req.messages[1]["tool_calls"][0]["function"]["name"] == "crm.find"
    assert req.called("crm.find") == ("find", "crm")
    assert req.called("other") == ("other", None)


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        (
            {"model": "m", "input": "x", "previous_response_id": "resp_1"},
            "previous_response_id",
            "not supported",
        ),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation", "not supported"),
        ({"model": "m"}, "input", "input: field required"),
        ({"model": "m", "input": "x", "max_output_tokens": 1e308}, "max_output_tokens", "at most"),
        ({"model": "m", "input": "x", "seed": 2**64}, "seed", "at most"),
        ({"model": "m", "input": [{"role": {"a": 1}, "content": "x"}]}, "input[0].role", None),
        ({"model": "m", "input": [{"type": ["message"]}]}, "input[0].type", None),
        ({"model": "m", "input": []}, "input", "must not be empty"),
        ({"model": "m", "input": 5}, "input", "string or a list"),
        ({"input": "x"}, "model", "model"),
        (
            {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
            "input[0]",
            "input item type .item_reference. is not supported .it names a stored item",
        ),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role", None),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0]",
            None,
        ),
        ({"model": "m", "input": [{"type": "function_call", "name": "f"}]}, "input[0]", "call_id"),
        (
            {"model": "m", "input": "x", "tools": [{"type": "web_search"}]},
            "tools[0]",
            "tool type .web_search. is not supported .hosted tools run at OpenAI",
        ),
        ({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice", None),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", None),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature", None),
        ({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format", None),
    ],
)
def test_validation_errors(body, param, match):
    with pytest.raises(InvalidRequest, match=match) as info:
        parse_responses_request(body)
    assert info.value.param == param


# -- output -------------------------------------------------------------------


def test_response_object_parsed_by_sdk():
    body = response_object(
        id="resp_1",
        created_at=10,
        model="m",
        text="Hello there",
        status="completed",
        usage=Usage(4, 3),
        incomplete_reason=None,
        message_id="msg_1",
    )
    result = _client(body).responses.create(model="m", input="hi")
    assert result.output_text == "Hello there"
    assert result.status == "completed"
    assert result.output[0].id == "msg_1"
    assert result.output[0].content[0].annotations == []
    assert result.usage.input_tokens == 4
    assert result.usage.total_tokens == 7
    assert result.usage.input_tokens_details.cached_tokens == 0
    assert result.usage.output_tokens_details.reasoning_tokens == 0
    assert result.incomplete_details is None


def test_incomplete_response_object():
    body = response_object(
        id="resp_1",
        created_at=10,
        model="m",
        text="Hel",
        status="incomplete",
        usage=Usage(4, 16),
        incomplete_reason="max_output_tokens",
        message_id="msg_1",
    )
    result = _client(body).responses.create(model="m", input="hi")
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.output[0].status == "incomplete"


def _stream_events(deltas: list[str], **finish) -> list[tuple[str, dict]]:
    stream = ResponsesStream(id="resp_s", created_at=3, model="m", message_id="msg_s")
    events = stream.start()
    for text in deltas:
        events += stream.delta(text)
    events += stream.finish(usage=Usage(5, len(deltas)), **finish)
    return events


def test_stream_event_order_and_sequence_numbers():
    events = _stream_events(["Hel", "", "lo"])
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(payload["type"] == name for name, payload in events)
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    delta = events[4][1]
    assert delta == {
        "type": "response.output_text.delta",
        "sequence_number": 4,
        "item_id": "msg_s",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hel",
        "logprobs": [],
    }


def test_stream_through_sdk_helper():
    body = _encode(_stream_events(["Hel", "lo", " world"]))
    with _client(body, stream=True).responses.stream(model="m", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hel", "lo", " world"]
    assert final.output_text == "Hello world"
    assert final.status == "completed"
    assert final.usage.output_tokens == 3


def test_stream_with_no_text_still_opens_item():
    events = _stream_events([])
    assert [n for n, _ in events][2:4] == [
        "response.output_item.added",
        "response.content_part.added",
    ]
    with _client(_encode(events), stream=True).responses.stream(model="m", input="hi") as stream:
        assert stream.get_final_response().output_text == ""


def test_incomplete_stream_through_sdk():
    events = _stream_events(["cut"], status="incomplete", incomplete_reason="max_output_tokens")
    assert events[-1][0] == "response.incomplete"
    stream = _client(_encode(events), stream=True).responses.create(
        model="m", input="hi", stream=True
    )
    received = list(stream)
    last = received[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].content[0].text == "cut"


def test_failed_stream():
    stream = ResponsesStream(id="resp_f", created_at=3, model="m")
    events = stream.start() + stream.delta("x") + stream.fail("neuron died")
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"] == {"code": "server_error", "message": "neuron died"}
    received = list(
        _client(_encode(events), stream=True).responses.create(model="m", input="hi", stream=True)
    )
    assert received[-1].response.status == "failed"
    assert stream.message_id.startswith("msg_")


def test_a_relayed_stream_fails_as_the_engines_response_numbered_on():
    # The gateway ends a stream it passed through: response.failed names
    # the engine's response and follows its last event.
    engine = ResponsesStream(id="resp_engine", created_at=7, model="m", echo={"user": "u"})
    events = engine.start() + engine.delta("Hel") + engine.delta("lo")
    relayed = RelayedResponse(model="m")
    for event in sse.SSEDecoder().feed(_encode(events)):
        relayed.see(event.data)
    events += relayed.fail("neuron died", code="upstream_error")
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    failed = events[-1][1]["response"]
    assert (failed["id"], failed["created_at"], failed["user"]) == ("resp_engine", 7, "u")
    assert failed["status"] == "failed" and failed["output"] == []
    assert failed["error"] == {"code": "upstream_error", "message": "neuron died"}
    with _client(_encode(events), stream=True).responses.stream(model="m", input="hi") as stream:
        assert [e.type for e in stream][-1] == "response.failed"


def test_a_relayed_stream_that_said_nothing_fails_as_a_response_of_its_own():
    (name, payload), *_ = RelayedResponse(model="m").fail("cut")
    assert name == "response.failed" and payload["sequence_number"] == 0
    assert payload["response"]["id"].startswith("resp_") and payload["response"]["model"] == "m"


def test_a_stream_started_early_adopts_the_engines_events():
    # The gateway sent created and in_progress before the engine's first
    # event: the engine's own are dropped, the rest take the gateway's id,
    # created_at and next sequence numbers.
    early = ResponsesStream(id="resp_early", created_at=1, model="m")
    events = early.start()
    for _, payload in _stream_events(["Hel", "lo"]):
        events += early.adopt(payload)
    names = [name for name, _ in events]
    assert names.count("response.created") == names.count("response.in_progress") == 1
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    assert events[-1][1]["response"]["id"] == "resp_early"
    assert events[-1][1]["response"]["created_at"] == 1
    with _client(_encode(events), stream=True).responses.stream(model="m", input="hi") as stream:
        assert stream.get_final_response().output_text == "Hello"
