import re

import anthropic
import httpx2
import pytest

from cortex import errors
from cortex.errors import InvalidRequest
from cortex.wire import anthropic as wire

TOOL = {"name": "f", "input_schema": {"type": "object"}}
ASK = {"role": "user", "content": "go"}
USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
CALL = {"role": "assistant", "content": [USE]}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}


def _body(**extra):
    return {
        "model": "claude-sonnet",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def test_parse_minimal():
    req = wire.parse_messages_request(_body())
    assert req.model == "claude-sonnet"
    assert req.max_tokens == 100
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.system is None and req.tools is None and req.tool_choice is None
    # Absent sampling stays None: the catalogue's per-model default applies.
    assert (req.temperature, req.top_p, req.top_k) == (None, None, None)
    assert req.stream is False and req.stop_sequences == ()


def test_parse_all_fields():
    tools = [{"name": "get", "description": "d", "input_schema": {"type": "object"}}]
    req = wire.parse_messages_request(
        _body(
            system=[{"type": "text", "text": "sys"}],
            stop_sequences=["END", ""],
            temperature=0.5,
            top_p=0.9,
            top_k=20,
            tools=tools,
            tool_choice={"type": "tool", "name": "get"},
            stream=True,
            metadata={"user_id": "u"},
        )
    )
    assert req.system == [{"type": "text", "text": "sys"}]
    assert req.stop_sequences == ("END",)
    assert (req.temperature, req.top_p, req.top_k) == (0.5, 0.9, 20)
    assert req.tools == tools
    assert req.tool_choice == {"type": "tool", "name": "get"}
    assert req.stream is True
    assert req.metadata == {"user_id": "u"}


def test_claude_code_body_is_accepted():
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": "billing", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Main prompt", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>x</system-reminder>"},
                    {"type": "text", "text": "fix it", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"cmd": "ls"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a.py"}],
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            },
            {"role": "system", "content": "mid-conversation reminder"},
        ],
        "tools": [
            {
                "name": "Bash",
                "description": "Run",
                "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": '{"device_id": "abc", "session_id": "s"}'},
    }
    req = wire.parse_messages_request(body)
    assert req.max_tokens == 32000
    assert req.messages[3]["role"] == "system"


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
            "max_tokens: field required",
        ),
        (_body(max_tokens=0), "max_tokens", "at least 1"),
        (_body(max_tokens=1e308), "max_tokens", "at most"),
        (_body(messages=[{"role": {"a": 1}, "content": "x"}]), "messages.0.role", None),
        (_body(messages=[{"role": ["user"], "content": "x"}]), "messages.0.role", None),
        (_body(top_k=2**40), "top_k", "at most"),
        (_body(max_tokens="many"), "max_tokens", "integer"),
        (_body(model=None), "model", "model: field required"),
        (_body(messages=None), "messages", "messages: field required"),
        (_body(messages=[]), "messages", "non-empty"),
        (_body(messages=[{"role": "bot", "content": "x"}]), "messages.0.role", "user or assistant"),
        (_body(messages=[{"role": "system", "content": "x"}]), "messages", "user or assistant"),
        (_body(messages=[{"role": "user"}]), "messages.0.content", "required"),
        (_body(messages=[{"role": "user", "content": 5}]), "messages.0.content", None),
        (
            _body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages.0.content.0.text",
            None,
        ),
        (
            _body(messages=[{"role": "user", "content": [{"type": "image"}]}]),
            "messages.0.content.0.source",
            None,
        ),
        (
            _body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]),
            "messages.0.content.0",
            "id",
        ),
        (
            _body(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]),
            "messages.0.content.0.tool_use_id",
            None,
        ),
        (
            _body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": 3}],
                    }
                ]
            ),
            "messages.0.content.0.content",
            None,
        ),
        (_body(system=7), "system", None),
        (_body(temperature=1.5), "temperature", None),
        (_body(top_k=-1), "top_k", None),
        (_body(stop_sequences="END"), "stop_sequences", None),
        (_body(stop_sequences=["s"] * 65), "stop_sequences", "at most 64"),
        (_body(tools=[{"description": "x"}]), "tools.0.name", None),
        (_body(tools=[{"name": "f", "input_schema": "x"}]), "tools.0.input_schema", None),
        (_body(tools=[{"name": "x", "description": "d"}]), "tools.0.input_schema", "required"),
        (_body(tools=[TOOL, {**TOOL, "input_schema": {}}]), "tools.1.input_schema", "object"),
        (_body(tools=[{**TOOL, "name": "get weather"}]), "tools.0.name", "'get weather'"),
        (_body(tools=[{**TOOL, "name": ""}]), "tools.0.name", "1 to 64"),
        (_body(tools=[{**TOOL, "name": "f" * 65}]), "tools.0.name", "1 to 64"),
        (_body(thinking={"type": "bogus"}), "thinking.type", "enabled .* disabled or adaptive"),
        (_body(thinking="on"), "thinking.type", None),
        (_body(thinking={"type": "enabled"}), "thinking.budget_tokens", "required"),
        (
            _body(thinking={"type": "enabled", "budget_tokens": 100}),
            "thinking.budget_tokens",
            "at least 1024",
        ),
        (_body(metadata={"user_id": "u", "team": "x"}), "metadata.team", "only user_id"),
        (_body(metadata={"user_id": 7}), "metadata.user_id", "string"),
        (_body(service_tier="priority"), "service_tier", "auto or standard_only"),
        (
            _body(mcp_servers=[{"type": "url", "url": "https://x", "name": "x"}]),
            "mcp_servers",
            "not supported",
        ),
        (
            _body(messages=[{"role": "user", "content": [USE]}], tools=[TOOL]),
            "messages.0.content.0",
            "a tool_use block belongs in an assistant message",
        ),
        (
            _body(messages=[ASK, {"role": "assistant", "content": [RESULT]}], tools=[TOOL]),
            "messages.1.content.0",
            "a tool_result block belongs in a user message",
        ),
        (
            _body(messages=[ASK, {"role": "system", "content": [USE]}], tools=[TOOL]),
            "messages.1.content.0",
            "belongs in an assistant message",
        ),
        (
            _body(messages=[ASK, CALL, {"role": "user", "content": [RESULT]}]),
            "messages.1.content.0",
            "must define tools",
        ),
        (
            _body(
                messages=[ASK, CALL, {"role": "user", "content": [{**RESULT, "tool_use_id": "x"}]}],
                tools=[TOOL],
            ),
            "messages.2.content.0",
            "unexpected tool_use_id found in tool_result blocks: x",
        ),
        (
            _body(messages=[ASK, {"role": "user", "content": [RESULT]}], tools=[TOOL]),
            "messages.1.content.0",
            "unexpected tool_use_id",
        ),
        (
            _body(messages=[ASK, CALL, {"role": "user", "content": "thanks"}], tools=[TOOL]),
            "messages.1",
            "tool_use ids were found without tool_result blocks immediately after: toolu_1",
        ),
        (
            # An answer two turns late is no answer.
            _body(
                messages=[
                    ASK,
                    CALL,
                    {"role": "user", "content": "wait"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [RESULT]},
                ],
                tools=[TOOL],
            ),
            "messages.1",
            "without tool_result blocks",
        ),
        (_body(tool_choice={"type": "sometimes"}), "tool_choice", None),
        (_body(tool_choice={"type": "tool"}), "tool_choice.name", None),
        (_body(tool_choice={"type": "any"}), "tool_choice", "needs tools"),
        (_body(tool_choice={"type": "tool", "name": "f"}, tools=[]), "tool_choice", "needs tools"),
        (
            _body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools.0.type",
            "'web_search_20250305' is not supported \\(server and built-in tools run at Anthropic",
        ),
        (_body(tools=[{"type": "bash_20250124", "name": "bash"}]), "tools.0.type", None),
        (_body(tools=[{"type": "text_editor_20250728", "name": "e"}]), "tools.0.type", None),
        (_body(tools=[{"type": "function", "name": "f"}]), "tools.0.type", None),
        (_body(stream="yes"), "stream", None),
        (_body(metadata="u"), "metadata", None),
    ],
)
def test_validation_errors(body, param, match):
    with pytest.raises(InvalidRequest, match=match) as info:
        wire.parse_messages_request(body)
    assert info.value.param == param


def test_custom_tools_and_no_tool_choice_without_tools_are_accepted():
    tool = {"name": "f", "input_schema": {"type": "object"}}
    req = wire.parse_messages_request(
        _body(tools=[tool, {**tool, "type": "custom"}, {**tool, "type": None}])
    )
    assert len(req.tools) == 3
    for choice in ({"type": "auto"}, {"type": "none"}):
        assert wire.parse_messages_request(_body(tool_choice=choice)).tool_choice == choice


def test_what_anthropic_takes_is_taken():
    many = [f"s{i}" for i in range(64)]
    assert wire.parse_messages_request(_body(stop_sequences=many)).stop_sequences == tuple(many)
    for thinking in (
        {"type": "adaptive"},
        {"type": "disabled"},
        {"type": "enabled", "budget_tokens": 1024},
        # Interleaved thinking: a budget past max_tokens is fine.
        {"type": "enabled", "budget_tokens": 40000},
    ):
        wire.parse_messages_request(_body(thinking=thinking))
    for metadata in ({}, {"user_id": None}, {"user_id": '{"session_id": "s"}'}):
        assert wire.parse_messages_request(_body(metadata=metadata)).metadata == metadata
    for tier in ("auto", "standard_only"):
        wire.parse_messages_request(_body(service_tier=tier))
    wire.parse_messages_request(_body(mcp_servers=[]))
    wire.parse_messages_request(_body(tools=[{**TOOL, "name": "mcp__server-1_x"}]))


def test_tool_pairs_as_clients_send_them():
    two = {"role": "assistant", "content": [USE, {**USE, "id": "toolu_2"}]}
    results = [{**RESULT, "tool_use_id": "toolu_2"}, RESULT]
    conversations = [
        # Claude Code: the results first (any order), text after, a system reminder.
        [ASK, two, {"role": "user", "content": [*results, {"type": "text", "text": "go on"}]}],
        [ASK, two, {"role": "system", "content": "reminder"}, {"role": "user", "content": results}],
        # Consecutive user messages are one turn, as at Anthropic.
        [
            ASK,
            two,
            {"role": "user", "content": [RESULT]},
            {"role": "user", "content": [results[0]]},
        ],
    ]
    for messages in conversations:
        wire.parse_messages_request(_body(messages=messages, tools=[TOOL]))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"thinking": {"type": "bogus"}}, "thinking.type"),
        ({"mcp_servers": [{"type": "url"}]}, "mcp_servers"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema"),
        (
            {"messages": [ASK, CALL, {"role": "user", "content": "no"}], "tools": [TOOL]},
            "messages.1",
        ),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    ],
)
def test_count_tokens_validates_as_create_does(extra, param):
    body = {"model": "m", "messages": [ASK], **extra}
    for parse, fields in (
        (wire.parse_messages_request, {"max_tokens": 5}),
        (wire.parse_count_tokens_request, {}),
    ):
        with pytest.raises(InvalidRequest) as info:
            parse({**body, **fields})
        assert info.value.param == param


def test_non_object_body():
    with pytest.raises(InvalidRequest, match="JSON object"):
        wire.parse_messages_request([1])


def test_count_tokens_needs_no_max_tokens():
    req = wire.parse_count_tokens_request(
        {
            "model": "m",
            "system": "s",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        }
    )
    assert (req.model, req.system, len(req.tools)) == ("m", "s", 1)
    assert wire.count_tokens_response(12) == {"input_tokens": 12}
    with pytest.raises(InvalidRequest):
        wire.parse_count_tokens_request({"model": "m"})


def test_new_message_id():
    assert re.fullmatch(r"msg_[0-9a-f]{24}", wire.new_message_id())


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (errors.InvalidRequest("bad"), 400, "invalid_request_error"),
        (errors.ContextOverflow("long"), 400, "invalid_request_error"),
        (errors.ChatTemplateMissing("tmpl"), 400, "invalid_request_error"),
        (errors.Unauthorized("key"), 401, "authentication_error"),
        (errors.ModelNotFound("none"), 404, "not_found_error"),
        (errors.PayloadTooLarge("big"), 413, "request_too_large"),
        (errors.QueueFull("busy"), 429, "rate_limit_error"),
        (errors.ModelLoadError("oops"), 500, "api_error"),
        (errors.UpstreamError("bad neuron"), 502, "api_error"),
        (errors.Unavailable("later"), 529, "overloaded_error"),
        (errors.NoHarness("no engine"), 529, "overloaded_error"),
        (errors.UpstreamTimeout("slow"), 504, "api_error"),
    ],
)
def test_error_body_and_status(exc, status, kind):
    assert wire.status_for(exc) == status
    assert wire.error_body(exc) == {
        "type": "error",
        "error": {"type": kind, "message": exc.message},
    }


def test_error_from_status():
    assert wire.error_from(403, "no")["error"]["type"] == "permission_error"
    assert wire.error_from(503, "x")["error"]["type"] == "overloaded_error"
    assert wire.error_from(418, "x")["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    ("exc", "sdk_error"),
    [
        (errors.InvalidRequest("bad"), anthropic.BadRequestError),
        (errors.Unauthorized("key"), anthropic.AuthenticationError),
        (errors.ModelNotFound("none"), anthropic.NotFoundError),
        (errors.QueueFull("busy"), anthropic.RateLimitError),
        (errors.Unavailable("later"), anthropic.APIStatusError),
    ],
)
def test_error_envelope_read_by_sdk(exc, sdk_error):
    # This anthropic SDK runs on httpx2, not httpx.
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(wire.status_for(exc), json=wire.error_body(exc))

    client = anthropic.Anthropic(
        api_key="x",
        base_url="http://t",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with pytest.raises(sdk_error) as info:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == wire.status_for(exc)
    assert info.value.body["error"]["message"] == exc.message
