import re

import httpx
import openai
import pytest

from cortex.errors import InvalidRequest, ModelNotFound, QueueFull
from cortex.harness import Sampling
from cortex.wire import openai as wire
from cortex.wire import sse
from cortex.wire.openai import SamplingOverrides, Usage


def _client(body: bytes | dict, *, status: int = 200, stream: bool = False) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        if stream:
            return httpx.Response(
                status, content=body, headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(status, json=body)

    return openai.OpenAI(
        api_key="x",
        base_url="http://t/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def _chat(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def _invalid(parse, body, param=None, match=None) -> InvalidRequest:
    with pytest.raises(InvalidRequest, match=match) as info:
        parse(body)
    if param is not None:
        assert info.value.param == param
    return info.value


# -- chat parsing -------------------------------------------------------------


def test_parse_minimal_chat():
    req = wire.parse_chat_request(_chat())
    assert req.model == "m"
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.max_tokens is None
    assert req.stop == ()
    assert req.stream is False
    assert req.include_usage is False
    assert req.sampling == SamplingOverrides()
    assert req.tools is None and req.tool_choice is None and req.response_format is None


def test_max_completion_tokens_wins():
    assert wire.parse_chat_request(_chat(max_tokens=5)).max_tokens == 5
    assert wire.parse_chat_request(_chat(max_completion_tokens=7)).max_tokens == 7
    req = wire.parse_chat_request(_chat(max_tokens=5, max_completion_tokens=9))
    assert req.max_tokens == 9


def test_stop_string_or_list():
    assert wire.parse_chat_request(_chat(stop="\n")).stop == ("\n",)
    assert wire.parse_chat_request(_chat(stop=["a", "b"])).stop == ("a", "b")
    assert wire.parse_chat_request(_chat(stop=None)).stop == ()
    # An empty stop string would stop at once; it is dropped.
    assert wire.parse_chat_request(_chat(stop=["", "x"])).stop == ("x",)


def test_stream_and_include_usage():
    req = wire.parse_chat_request(_chat(stream=True, stream_options={"include_usage": True}))
    assert req.stream and req.include_usage
    assert not wire.parse_chat_request(_chat(stream=True)).include_usage
    # Without a stream there is no usage chunk to send.
    assert not wire.parse_chat_request(_chat(stream_options={"include_usage": True})).include_usage


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        (_chat(n=2), "n", "n > 1 is not supported"),
        (_chat(temperature=2.5), "temperature", r"temperature must be in \[0, 2\]"),
        (_chat(temperature="hot"), "temperature", "must be a number"),
        (_chat(temperature=True), "temperature", "must be a number"),
        (_chat(top_p=-0.5), "top_p", r"top_p must be in \[0, 1\], got -0.5"),
        (_chat(top_p=1.5), "top_p", "top_p"),
        (_chat(max_tokens=-1), "max_tokens", "at least 1"),
        (_chat(max_completion_tokens="9"), "max_completion_tokens", "integer"),
        (_chat(max_tokens=True), "max_tokens", "integer"),
        (_chat(stop=["s"] * 65), "stop", "at most 64"),
        (_chat(stop=[1]), "stop", "string or a list of strings"),
        (_chat(presence_penalty=3), "presence_penalty", "presence_penalty"),
        (_chat(top_k=-1), "top_k", "at least 0"),
        (_chat(min_p=1.5), "min_p", "min_p"),
        (_chat(repeat_penalty=-1), "repeat_penalty", "repeat_penalty must be at least 0"),
        (_chat(seed=1.5), "seed", "integer"),
        (_chat(stream="yes"), "stream", "boolean"),
        (_chat(logprobs=True), "logprobs", "not supported"),
        (_chat(response_format={"type": "xml"}), "response_format", "text, json_object"),
        (_chat(response_format={"type": "json_schema"}), "response_format.json_schema", None),
        (_chat(tool_choice="sometimes"), "tool_choice", None),
        (_chat(tool_choice={"type": "function"}), "tool_choice", None),
        (_chat(tools={"type": "function"}), "tools", "list"),
        (
            _chat(tools=[{"type": "retrieval"}]),
            "tools[0]",
            "type .retrieval. is not supported .cortex",
        ),
        (_chat(tools=[{"type": "custom", "custom": {"name": "p"}}]), "tools[0]", "free-form text"),
        (_chat(tools=[{"type": "function", "function": {}}]), "tools[0]", "name"),
        (_chat(user=5), "user", "string"),
        (_chat(stream_options=True), "stream_options", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "model: field required"),
        ({"model": "", "messages": []}, "model", "non-empty"),
        ({"model": "m"}, "messages", "messages: field required"),
        ({"model": "m", "messages": []}, "messages", "must not be empty"),
        ({"model": "m", "messages": "hi"}, "messages", "must be a list"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]", "must be an object"),
        (
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "role must be one of",
        ),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "required"),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            None,
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0]",
            "type",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "42"}]},
            "messages[0].tool_call_id",
            None,
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
            },
            "messages[0].tool_calls[0]",
            "function.name",
        ),
    ],
)
def test_chat_validation_errors(body, param, match):
    _invalid(wire.parse_chat_request, body, param, match)


@pytest.mark.parametrize(
    ("extra", "param", "match"),
    [
        ({"max_tokens": 1e308}, "max_tokens", "at most 2147483647"),
        ({"max_tokens": 2**31}, "max_tokens", "at most 2147483647, got 2147483648$"),
        ({"max_tokens": 1e300}, "max_tokens", r"got 1e\+300$"),
        ({"max_completion_tokens": 1e300}, "max_completion_tokens", "at most"),
        ({"top_k": 1e308}, "top_k", "at most"),
        ({"seed": 2**64}, "seed", "at most"),
        ({"seed": -(2**63) - 1}, "seed", "at least"),
        ({"temperature": 1e308}, "temperature", "in"),
        ({"logit_bias": "x"}, "logit_bias", "object mapping token ids"),
        ({"logit_bias": ["1"]}, "logit_bias", "object mapping token ids"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "is no token id"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "is no token id"),
        ({"logit_bias": {"\u0661": 1}}, "logit_bias", "is no token id"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "got 101"),
        ({"logit_bias": {"12": "1"}}, "logit_bias", "got '1'"),
        ({"logit_bias": {"12": True}}, "logit_bias", "got true"),
    ],
)
def test_numbers_and_biases_are_bounded(extra, param, match):
    parsers = [wire.parse_chat_request]
    if param != "max_completion_tokens":  # a chat field only
        parsers.append(wire.parse_completion_request)
    for parse in parsers:
        _invalid(parse, {**_chat(prompt="x"), **extra}, param, match)


def test_logit_bias_in_range_is_accepted():
    bias = {"12": -100, "7": 2.5, "0": 100}
    assert wire.parse_chat_request(_chat(logit_bias=bias)).logit_bias == bias
    assert wire.parse_completion_request({"model": "m", "prompt": "x", "logit_bias": {}})
    assert wire.parse_chat_request(_chat(logit_bias=None, max_tokens=2**31 - 1))


@pytest.mark.parametrize("junk", [{"a": 1}, ["user"], 5])
def test_unhashable_or_odd_enums_are_400(junk):
    _invalid(wire.parse_chat_request, _chat(messages=[{"role": junk, "content": "x"}]))
    _invalid(wire.parse_chat_request, _chat(response_format={"type": junk}), "response_format")


def test_token_ids_are_bounded():
    _invalid(wire.parse_completion_request, {"model": "m", "prompt": [2**31]}, "prompt")


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_chat_body_must_be_object(body):
    _invalid(wire.parse_chat_request, body, match="JSON object")


def test_chat_keeps_text_and_tool_turns():
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = wire.parse_chat_request(
        {
            "model": "m",
            "messages": messages,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "user": "u1",
        }
    )
    # Text parts become one string, developer the system role templates know.
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        *messages[2:],
    ]
    assert req.tools == tools
    assert req.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert req.parallel_tool_calls is False
    assert req.response_format["type"] == "json_schema"
    assert req.user == "u1"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "f"}},
        {"type": "video_url", "video_url": {"url": "x"}},
    ],
)
def test_non_text_content_is_refused_by_name(part):
    """A part no model here can read is a 400 naming it, never dropped or printed."""
    content = [{"type": "text", "text": "what is this?"}, part]
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}],
    }
    error = _invalid(wire.parse_chat_request, body, param="messages[1].content[1]")
    assert error.message == (
        f"messages[1].content[1]: content block type {part['type']!r} "
        "is not supported by model 'tiny'"
    )


def test_refusal_parts_are_text():
    content = [{"type": "refusal", "refusal": "no"}, {"type": "text", "text": "then"}]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": content}]
    req = wire.parse_chat_request({"model": "m", "messages": messages})
    assert req.messages[1] == {"role": "assistant", "content": "no\nthen"}


def test_sampling_fields_including_llamacpp_extras():
    req = wire.parse_chat_request(
        _chat(
            temperature=0,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            seed=42,
            n=1,
            logprobs=False,
        )
    )
    assert req.sampling == SamplingOverrides(
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repeat_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=42,
    )


def test_integral_float_is_an_integer():
    assert wire.parse_chat_request(_chat(max_tokens=16.0)).max_tokens == 16


def test_sampling_apply_precedence():
    overrides = SamplingOverrides(temperature=0.2, seed=7)
    defaults = {"temperature": 0.8, "top_k": 40, "top_p": None, "grammar": "ignored"}
    sampling = overrides.apply(defaults)
    assert sampling == Sampling(temperature=0.2, top_k=40, seed=7)
    assert SamplingOverrides().apply({}) == Sampling()


# -- completions parsing ------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        ("", [""]),
    ],
)
def test_completion_prompt_forms(prompt, prompts):
    req = wire.parse_completion_request({"model": "m", "prompt": prompt})
    assert req.prompts == prompts
    assert req.max_tokens == 16


def test_completion_fields():
    req = wire.parse_completion_request(
        {
            "model": "m",
            "prompt": "x",
            "max_tokens": 5,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "echo": False,
            "suffix": "",
            "logprobs": None,
            "best_of": 1,
        }
    )
    assert (req.max_tokens, req.stop, req.stream, req.include_usage) == (5, ("\n",), True, True)
    assert req.sampling.temperature == 0
    assert (
        wire.parse_completion_request({"model": "m", "prompt": "x", "max_tokens": None}).max_tokens
        == 16
    )


@pytest.mark.parametrize(
    ("extra", "param", "match"),
    [
        ({"prompt": None}, "prompt", "prompt: field required"),
        ({}, "prompt", "prompt: field required"),
        ({"prompt": []}, "prompt", "prompt must be"),
        ({"prompt": ["a", 1]}, "prompt", "prompt must be"),
        ({"prompt": [1, -2]}, "prompt", "prompt must be"),
        ({"prompt": [[1], []]}, "prompt", "prompt must be"),
        ({"prompt": [True]}, "prompt", "prompt must be"),
        ({"prompt": "x", "echo": True}, "echo", "echo is not supported"),
        ({"prompt": "x", "suffix": "end"}, "suffix", "suffix is not supported"),
        ({"prompt": "x", "logprobs": 0}, "logprobs", "logprobs is not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of > 1"),
        ({"prompt": "x", "n": 2}, "n", "n > 1 is not supported"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ],
)
def test_completion_validation_errors(extra, param, match):
    _invalid(wire.parse_completion_request, {"model": "m", **extra}, param, match)


# -- builders through the SDK -------------------------------------------------


def test_ids_and_usage():
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", wire.new_id("chatcmpl"))
    assert wire.new_id("x") != wire.new_id("x")
    assert isinstance(wire.now(), int)
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    assert usage.total_tokens == 7
    assert usage.to_openai() == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    cached = Usage(prompt_tokens=30, completion_tokens=4, cached_tokens=20).to_openai()
    assert cached["prompt_tokens_details"] == {"cached_tokens": 20}


def test_chat_completion_parsed_by_sdk():
    body = wire.chat_completion(
        id="chatcmpl-1",
        created=100,
        model="m",
        content="Hello",
        finish_reason="stop",
        usage=Usage(5, 2),
    )
    assert "stop_sequence" not in body["choices"][0]
    result = _client(body).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert result.id == "chatcmpl-1"
    assert result.choices[0].message.content == "Hello"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.total_tokens == 7


def test_chat_completion_with_tool_calls_and_stop_sequence():
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    body = wire.chat_completion(
        id="c",
        created=1,
        model="m",
        content=None,
        finish_reason="tool_calls",
        usage=Usage(1, 1),
        tool_calls=calls,
    )
    result = _client(body).chat.completions.create(model="m", messages=[])
    assert result.choices[0].message.tool_calls[0].function.arguments == '{"a":1}'
    body = wire.chat_completion(
        id="c",
        created=1,
        model="m",
        content="x",
        finish_reason="stop",
        usage=Usage(1, 1),
        stop_sequence="END",
    )
    assert body["choices"][0]["stop_sequence"] == "END"


def _chat_stream(include_usage: bool = True) -> bytes:
    common = {"id": "chatcmpl-s", "created": 5, "model": "m", "include_usage": include_usage}
    chunks = [
        wire.chat_chunk(delta={"role": "assistant", "content": "Hel"}, **common),
        wire.chat_chunk(delta={"content": "lo"}, **common),
        wire.chat_chunk(
            delta={
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get", "arguments": ""},
                    }
                ]
            },
            **common,
        ),
        wire.chat_chunk(
            delta={"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}, **common
        ),
        wire.chat_chunk(
            delta={"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}, **common
        ),
        wire.chat_chunk(delta={}, finish_reason="tool_calls", **common),
    ]
    frames = [sse.encode(c) for c in chunks]
    if include_usage:
        frames.append(
            sse.encode(wire.usage_chunk(id="chatcmpl-s", created=5, model="m", usage=Usage(9, 6)))
        )
    return b"".join(frames) + sse.DONE


def test_chat_chunks_carry_usage_null_only_when_asked():
    with_usage = wire.chat_chunk(id="i", created=1, model="m", delta={}, include_usage=True)
    assert with_usage["usage"] is None
    assert "usage" not in wire.chat_chunk(id="i", created=1, model="m", delta={})
    chunk = wire.chat_chunk(id="i", created=1, model="m", delta={}, stop_sequence="##")
    assert chunk["choices"][0]["stop_sequence"] == "##"
    usage = wire.usage_chunk(id="i", created=1, model="m", usage=Usage(1, 2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_chat_stream_through_sdk():
    stream = _client(_chat_stream(), stream=True).chat.completions.create(
        model="m", messages=[], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {"chatcmpl-s"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_stream_helper_accumulates_tool_call_fragments():
    client = _client(_chat_stream(), stream=True)
    with client.chat.completions.stream(model="m", messages=[]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Hello"
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_a",
        "get",
        '{"city": "Oslo"}',
    )
    assert final.usage.prompt_tokens == 9


def test_text_completion_parsed_by_sdk():
    body = wire.text_completion(
        id="cmpl-1",
        created=1,
        model="m",
        choices=[("one", "stop"), ("two", "length")],
        usage=Usage(2, 3),
    )
    result = _client(body).completions.create(model="m", prompt=["a", "b"])
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [
        (0, "one", "stop"),
        (1, "two", "length"),
    ]
    assert result.usage.total_tokens == 5


def test_completion_stream_through_sdk():
    frames = [
        wire.completion_chunk(id="cmpl-2", created=1, model="m", text="ab"),
        wire.completion_chunk(id="cmpl-2", created=1, model="m", text="c", finish_reason="length"),
    ]
    body = b"".join(sse.encode(f) for f in frames) + sse.DONE
    chunks = list(_client(body, stream=True).completions.create(model="m", prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[0].object == "text_completion"


def test_model_list_parsed_by_sdk():
    body = wire.model_list(
        [wire.model_entry("a/b", created=1, loaded=True), wire.model_entry("c", created=2)]
    )
    assert body["data"][0] == {
        "id": "a/b",
        "object": "model",
        "created": 1,
        "owned_by": "cortex",
        "loaded": True,
    }
    models = list(_client(body).models.list())
    assert [m.id for m in models] == ["a/b", "c"]


def test_error_body_raised_by_sdk():
    exc = InvalidRequest("temperature must be in [0, 2]", param="temperature")
    body = wire.error_body(exc)
    assert body == {
        "error": {
            "message": "temperature must be in [0, 2]",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    with pytest.raises(openai.BadRequestError) as info:
        _client(body, status=400).chat.completions.create(model="m", messages=[])
    assert info.value.param == "temperature"
    assert wire.error_body(ModelNotFound("no model x"))["error"]["code"] == "model_not_found"
    assert wire.error_body(QueueFull("busy"))["error"]["type"] == "rate_limit_error"


def test_error_from_status():
    assert wire.error_from(404, "no route")["error"]["type"] == "invalid_request_error"
    assert wire.error_from(405, "method")["error"]["type"] == "invalid_request_error"
    assert wire.error_from(502, "bad")["error"]["type"] == "server_error"


def test_mid_stream_error_raised_by_sdk():
    chunk = wire.chat_chunk(id="i", created=1, model="m", delta={"content": "x"})
    body = sse.encode(chunk) + sse.encode(wire.error_from(500, "neuron died"))
    stream = _client(body, stream=True).chat.completions.create(model="m", messages=[], stream=True)
    with pytest.raises(openai.APIError, match="neuron died"):
        list(stream)
