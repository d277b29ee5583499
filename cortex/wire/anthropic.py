"""The Anthropic messages dialect: request parsing and the error envelope.

The gateway serves it by translation (:mod:`cortex.wire.translate`). Parsing
is strict about what it uses and lenient about the rest: Claude Code sends
``thinking``, ``context_management``, ``output_config``, ``cache_control`` on
blocks and mid-conversation ``system`` messages, and must never get a 400
for them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from cortex.errors import ContextOverflow, CortexError, InvalidRequest, ThreadUnsupported
from cortex.wire import fields

ROLES = frozenset({"user", "assistant", "system"})
#: Anthropic's rule for a tool's name.
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive"})
#: Anthropic's least thinking budget; cortex ignores the budget but not a bad one.
MIN_THINKING_BUDGET = 1024
SERVICE_TIERS = frozenset({"auto", "standard_only"})
#: The role each tool block belongs in, and what the block is there.
_TOOL_BLOCK_ROLES = {
    "tool_use": ("assistant", "the model's call"),
    "tool_result": ("user", "the answer to a tool_use of the assistant message before"),
}


def _is_one_of(value: Any, choices: frozenset[str]) -> bool:
    # A dict or a list is unhashable: `in` a frozenset would raise TypeError.
    return isinstance(value, str) and value in choices


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


# -- parsing ------------------------------------------------------------------


def _check_block(block: Any, where: str) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"{where} must be an object with a type", param=where)
    kind = block["type"]
    if kind == "text" and not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
    elif kind == "image" and not isinstance(block.get("source"), dict):
        raise InvalidRequest(f"{where}.source must be an object", param=f"{where}.source")
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise InvalidRequest(f"{where}: tool_use needs an id and a name", param=where)
        if not isinstance(block.get("input", {}), dict):
            raise InvalidRequest(f"{where}.input must be an object", param=f"{where}.input")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise InvalidRequest(
                f"{where}.tool_use_id must be a string", param=f"{where}.tool_use_id"
            )
        content = block.get("content")
        if isinstance(content, list):
            for j, inner in enumerate(content):
                _check_block(inner, f"{where}.content.{j}")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(
                f"{where}.content must be a string or a list of blocks",
                param=f"{where}.content",
            )
    # Other types (thinking, redacted_thinking, document, ...) pass through;
    # the translation says what it does with each.


def _content(value: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for j, block in enumerate(value):
            _check_block(block, f"{where}.{j}")
        return value
    raise InvalidRequest(f"{where} must be a string or a list of blocks", param=where)


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages: field required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if not _is_one_of(message.get("role"), ROLES):
            raise InvalidRequest(
                f"{where}.role must be user or assistant (or system, mid-conversation), "
                f"got {fields.shown(message.get('role'))}",
                param=f"{where}.role",
            )
        if "content" not in message:
            raise InvalidRequest(f"{where}.content: field required", param=f"{where}.content")
        _check_tool_block_roles(
            message["role"], _content(message["content"], f"{where}.content"), where
        )
    # A system message is kept for Claude Code, which sends one after a user
    # turn (its mid-conversation-system beta); alone it is no conversation.
    if all(message["role"] == "system" for message in messages):
        raise InvalidRequest(
            "messages must hold a user or assistant message: system messages only join "
            "a conversation; a system prompt goes in the top-level system field",
            param="messages",
        )
    return messages


def _check_prefill(messages: list[dict[str, Any]]) -> bool:
    """Whether the conversation ends with an assistant turn to continue (a prefill).

    The answer continues that turn's text, as Anthropic's API does, so it
    must be text only, and, as there, end without whitespace: a tokenizer
    writes a word with the space before it, and a prefill that ends with
    the space leaves the model a token it rarely saw.

    Raises:
      InvalidRequest: a ``tool_use`` block in that turn, or trailing whitespace.
    """
    i = len(messages) - 1
    last = messages[i]
    if last["role"] != "assistant":
        return False
    where = f"messages.{i}.content"
    content = last["content"]
    if isinstance(content, str):
        texts = [content]
    else:
        for j, block in enumerate(content):
            if block["type"] == "tool_use":
                raise InvalidRequest(
                    f"{where}.{j}: a final assistant turn is a prefill the answer continues, "
                    "and must be text only: it cannot hold a tool_use block",
                    param=f"{where}.{j}",
                )
        texts = [block["text"] for block in content if block["type"] == "text"]
    if texts and texts[-1] != texts[-1].rstrip():
        raise InvalidRequest(
            f"{where}: final assistant content cannot end with trailing whitespace",
            param=where,
        )
    return True


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _check_tool_block_roles(role: str, content: str | list[dict[str, Any]], where: str) -> None:
    """A tool_use block only in an assistant message, a tool_result only in a user one."""
    for j, block in enumerate(content if isinstance(content, list) else ()):
        belongs = _TOOL_BLOCK_ROLES.get(block["type"])
        if belongs is not None and belongs[0] != role:
            here = f"{where}.content.{j}"
            raise InvalidRequest(
                f"{here}: a {block['type']} block belongs in {_a(belongs[0])} message "
                f"({belongs[1]}), not in {_a(role)} one",
                param=here,
            )


def _tool_blocks(
    messages: list[dict[str, Any]],
) -> list[tuple[str, int, list[tuple[str, dict[str, Any]]]]]:
    """(role, first message index, [(place, tool block)]) per turn.

    A turn is a run of messages of one role, as Anthropic's API joins
    consecutive ones; system messages (Claude Code's mid-conversation ones)
    are no turn and split none.
    """
    turns: list[tuple[str, int, list[tuple[str, dict[str, Any]]]]] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            continue
        blocks = [
            (f"messages.{i}.content.{j}", block)
            for j, block in enumerate(content if isinstance(content, list) else ())
            if block["type"] in _TOOL_BLOCK_ROLES
        ]
        if turns and turns[-1][0] == role:
            turns[-1][2].extend(blocks)
        else:
            turns.append((role, i, blocks))
    return turns


def _check_tool_pairs(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Anthropic's pairing rules for tool blocks (the roles are checked already).

    Every tool_result answers a tool_use of the assistant turn just before,
    and every tool_use of an assistant turn is answered in the user turn
    just after (a last assistant turn is a prefill: ``_check_prefill``).
    Tool blocks need ``tools``. The results may come in any order and with
    text after them, as Claude Code sends them.
    """
    calls: dict[str, str] = {}  # the last assistant turn's tool_use ids -> its place
    asked_at = ""
    for role, first, blocks in _tool_blocks(messages):
        if blocks and not tools:
            here = blocks[0][0]
            raise InvalidRequest(
                f"{here}: a request with tool_use or tool_result blocks must define tools "
                "(the tools field)",
                param=here,
            )
        if role == "assistant":
            calls = {block["id"]: where for where, block in blocks}
            asked_at = f"messages.{first}"
            continue
        answered: set[str] = set()
        for where, block in blocks:
            if block["tool_use_id"] not in calls:
                raise InvalidRequest(
                    f"{where}: unexpected tool_use_id found in tool_result blocks: "
                    f"{block['tool_use_id']}. Each tool_result block must have a corresponding "
                    "tool_use block in the previous message.",
                    param=where,
                )
            answered.add(block["tool_use_id"])
        unanswered = [call for call in calls if call not in answered]
        if unanswered:
            raise InvalidRequest(
                f"{asked_at}: tool_use ids were found without tool_result blocks immediately "
                f"after: {', '.join(unanswered)}. Each tool_use block must have a "
                "corresponding tool_result block in the next message.",
                param=asked_at,
            )
        calls = {}


def _system(body: Mapping[str, Any]) -> str | list[dict[str, Any]] | None:
    system = body.get("system")
    if system is None:
        return None
    return _content(system, "system")


def _stop_sequences(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop_sequences")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop_sequences must be a list of strings", param="stop_sequences")
    fields.check_stop_count(value, "stop_sequences")
    return tuple(s for s in value if s)


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            # A server or built-in tool (web_search_20250305, bash_20250124,
            # text_editor_*, ...) runs on Anthropic's side or has a schema
            # only Anthropic's models know: nothing here can honour it.
            raise fields.unsupported_type(
                f"{where}.type",
                "tool",
                kind,
                serves="only custom tools (a name, a description and an input_schema; "
                "type absent or 'custom')",
                why="server and built-in tools run at Anthropic or have a schema only "
                "Anthropic's models know",
                todo="remove it",
            )
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"{where}.name must be a string", param=f"{where}.name")
        if not TOOL_NAME.fullmatch(tool["name"]):
            raise InvalidRequest(
                f"{where}.name must be 1 to 64 letters, digits, '_' or '-', "
                f"got {tool['name'][:80]!r}",
                param=f"{where}.name",
            )
        schema = tool.get("input_schema")
        if schema is None:
            raise InvalidRequest(
                f"{where}.input_schema: field required", param=f"{where}.input_schema"
            )
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(
                f'{where}.input_schema must be a JSON schema of an object ({{"type": "object", '
                "...}})",
                param=f"{where}.input_schema",
            )
    return tools


def _tool_choice(
    body: Mapping[str, Any], tools: list[dict[str, Any]] | None
) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest(
            "tool_choice.type must be auto, any, tool or none", param="tool_choice"
        )
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise InvalidRequest("tool_choice.name must be a string", param="tool_choice.name")
    if kind in ("any", "tool") and not tools:
        raise InvalidRequest(
            f"tool_choice.type {kind!r} needs tools: the request has none", param="tool_choice"
        )
    if kind == "tool" and all(tool["name"] != choice["name"] for tool in tools or ()):
        raise InvalidRequest(
            f"tool_choice.name: no tool named {fields.shown(choice['name'])} in tools",
            param="tool_choice.name",
        )
    return choice


def _output_format(body: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Where the body asks for structured output, and its JSON schema (None: it does not).

    The ``anthropic`` SDK's ``messages.parse(output_format=Model)`` sends
    ``output_config: {"format": {"type": "json_schema", "schema": {...}}}``;
    the structured-outputs beta sent the same object as a top-level
    ``output_format``. ``output_config``'s other keys (``effort``) are
    ignored: Claude Code sends them and a local model has no use for them.
    """
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise InvalidRequest("output_config must be an object", param="output_config")
    where, fmt = "output_config.format", (config or {}).get("format")
    if fmt is None:
        where, fmt = "output_format", body.get("output_format")
    if fmt is None:
        return "output_config.format", None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest(
            f'{where} must be {{"type": "json_schema", "schema": {{...}}}}', param=where
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.schema must be an object", param=f"{where}.schema")
    return where, schema


def _metadata(body: Mapping[str, Any]) -> dict[str, Any] | None:
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", param="metadata")
    for key in metadata:
        if key != "user_id":
            raise InvalidRequest(
                f"metadata.{key}: unknown field; metadata holds only user_id",
                param=f"metadata.{key}",
            )
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise InvalidRequest("metadata.user_id must be a string", param="metadata.user_id")
    return metadata


def _service_tier(body: Mapping[str, Any]) -> None:
    tier = body.get("service_tier")
    if tier is not None and not _is_one_of(tier, SERVICE_TIERS):
        raise InvalidRequest(
            f"service_tier must be auto or standard_only, got {tier!r}", param="service_tier"
        )


def _thinking(body: Mapping[str, Any]) -> None:
    """``thinking`` is checked, then ignored: a local model has no thinking budget.

    Claude Code sends ``{"type": "adaptive"}``; ``budget_tokens`` may exceed
    ``max_tokens`` (interleaved thinking), so only its least is checked.
    """
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if not _is_one_of(kind, THINKING_TYPES):
        raise InvalidRequest(
            "thinking.type must be enabled (with budget_tokens), disabled or adaptive, "
            f"got {kind!r}",
            param="thinking.type",
        )
    if kind == "enabled":
        if thinking.get("budget_tokens") is None:
            raise InvalidRequest(
                "thinking.budget_tokens: field required (thinking enabled)",
                param="thinking.budget_tokens",
            )
        fields.Integer(MIN_THINKING_BUDGET, fields.MAX_TOKENS).check(
            "thinking.budget_tokens", fields.whole(thinking["budget_tokens"])
        )


def _thread(body: Mapping[str, Any]) -> None:
    """A message thread (``thread``, the ``message-threads`` beta) is a 400 the SDKs act on.

    Anthropic's API keeps a thread's conversation and each turn sends only
    what is new; cortex keeps none, and a turn that continued a thread
    would reach the model without its history. The SDKs' tool runners use
    threads by default and, on this error, send the whole history instead.
    """
    if body.get("thread") is not None:
        raise ThreadUnsupported(
            "thread is not supported: cortex keeps no conversation between requests; "
            "send the whole conversation in messages, without thread",
            param="thread",
        )


def _mcp_servers(body: Mapping[str, Any]) -> None:
    if body.get("mcp_servers"):
        # Anthropic's API connects to them (the MCP connector); a local
        # fleet has no such client and cannot reach the user's servers.
        raise InvalidRequest(
            "mcp_servers is not supported: MCP servers are reached by Anthropic's API; "
            "run them in the client and send their tools as custom tools",
            param="mcp_servers",
        )


@attrs.frozen
class MessagesRequest:
    """A validated ``POST /v1/messages`` body.

    ``messages`` and ``system`` are kept as sent; sampling fields are None
    when absent so the model's catalogue defaults apply, not a fixed 1.0.
    """

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    #: The JSON schema of ``output_config.format``; None: free text.
    output_schema: dict[str, Any] | None = None
    #: Where the body holds it: ``output_config.format``, or the beta's ``output_format``.
    output_field: str = "output_config.format"
    #: ``messages`` ends with an assistant turn whose text the answer continues.
    prefill: bool = False


@attrs.frozen
class CountTokensRequest:
    """A validated ``POST /v1/messages/count_tokens`` body."""

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    #: As :attr:`MessagesRequest.prefill`: counted as the answer would see it.
    prefill: bool = False


def _prompt_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields ``create`` and ``count_tokens`` share, checked alike.

    ``thinking``, ``mcp_servers``, ``output_config`` and what a prefill
    cannot be combined with are checked in both too: a body ``count_tokens``
    takes must be one ``create`` takes. ``thread`` comes first: a turn
    that continues a thread sends only what is new, which alone may look
    like a broken conversation (a tool_result with no tools).
    """
    _thread(body)
    messages = _messages(body)
    tools = _tools(body)
    _check_tool_pairs(messages, tools)
    _thinking(body)
    _mcp_servers(body)
    tool_choice = _tool_choice(body, tools)
    output_field, output_schema = _output_format(body)
    prefill = _check_prefill(messages)
    if prefill and tool_choice is not None and tool_choice["type"] in ("any", "tool"):
        kind = tool_choice["type"]
        raise fields.prefill_conflict("tool_choice", f"type {kind!r} (a forced tool call)")
    if prefill and output_schema is not None:
        raise fields.prefill_conflict(output_field, "structured output")
    return {
        "model": fields.model(body),
        "messages": messages,
        "system": _system(body),
        "tools": tools,
        "tool_choice": tool_choice,
        "output_schema": output_schema,
        "output_field": output_field,
        "prefill": prefill,
    }


def parse_messages_request(body: Any) -> MessagesRequest:
    """Validate a decoded messages body; unknown top-level keys are ignored.

    ``max_tokens`` is only checked to be a positive integer: clamping it to
    the context that is left is the caller's job (Claude Code sends 32000).

    Raises:
      InvalidRequest: a required field is missing or a used one is malformed.
    """
    body = fields.require_object(body)
    fields.model(body)
    max_tokens = fields.opt_tokens(body, "max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: field required", param="max_tokens")
    prompt = _prompt_fields(body)
    _service_tier(body)
    return MessagesRequest(
        max_tokens=max_tokens,
        stop_sequences=_stop_sequences(body),
        temperature=fields.opt_float(body, "temperature", low=0, high=1),
        top_p=fields.opt_float(body, "top_p", low=0, high=1),
        top_k=fields.opt_int(body, "top_k", minimum=0, maximum=fields.MAX_TOKENS),
        stream=bool(fields.opt_bool(body, "stream")),
        metadata=_metadata(body),
        **prompt,
    )


def parse_count_tokens_request(body: Any) -> CountTokensRequest:
    """Validate a count_tokens body (no ``max_tokens`` needed) as ``create`` would."""
    body = fields.require_object(body)
    prompt = _prompt_fields(body)
    return CountTokensRequest(
        model=prompt["model"],
        messages=prompt["messages"],
        system=prompt["system"],
        tools=prompt["tools"],
        prefill=prompt["prefill"],
    )


def count_tokens_response(input_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens}


# -- models -------------------------------------------------------------------

#: ``GET /v1/models``'s page size: Anthropic's default and range.
MODELS_LIMIT = 20
MODELS_LIMIT_RANGE = (1, 1000)


def model_info(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI ``/v1/models`` entry (``openai.model_entry``) as Anthropic's ``ModelInfo``.

    cortex's own fields (``loaded``, ``status``, ``alias_of``, ...) stay; the
    context, where known, is also ``max_input_tokens``, where the SDK reads it.
    """
    info = {k: v for k, v in entry.items() if k not in ("object", "created", "owned_by")}
    created = datetime.fromtimestamp(entry["created"], UTC)
    context = {"max_input_tokens": entry["context_length"]} if "context_length" in entry else {}
    return {
        "type": "model",
        "id": entry["id"],
        "display_name": entry["id"],
        "created_at": created.isoformat().replace("+00:00", "Z"),
        **context,
        **info,
    }


def model_page(entries: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of ``GET /v1/models`` in Anthropic's shape, by its query.

    ``limit`` (default 20, 1 to 1000) entries after ``after_id``, or the
    last ``limit`` before ``before_id``, or the first ``limit``;
    ``has_more`` says whether more lie beyond the page that way.

    Raises:
      InvalidRequest: a bad ``limit``, both ids, or an id that is no model.
    """
    raw = query.get("limit")
    try:
        limit = MODELS_LIMIT if raw is None else int(raw)
    except ValueError:
        raise InvalidRequest(f"limit must be an integer, got {raw!r}", param="limit") from None
    fields.Integer(*MODELS_LIMIT_RANGE).check("limit", limit)
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise InvalidRequest("give after_id or before_id, not both", param="before_id")
    ids = [entry["id"] for entry in entries]

    def index(key: str, model_id: str) -> int:
        if model_id not in ids:
            raise InvalidRequest(f"{key}: no model {model_id!r}", param=key)
        return ids.index(model_id)

    if before is not None:
        end = index("before_id", before)
        start = max(0, end - limit)
        page, has_more = entries[start:end], start > 0
    else:
        start = 0 if after is None else index("after_id", after) + 1
        page, has_more = entries[start : start + limit], start + limit < len(entries)
    data = [model_info(entry) for entry in page]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# -- errors -------------------------------------------------------------------

#: Anthropic's error types, one per status: the dialect's names for the
#: statuses the error tree answers with (``CortexError.status``).
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def status_for(exc: CortexError) -> int:
    """The HTTP status for ``exc`` in this dialect.

    "Nobody can serve it now" is 529 overloaded for Anthropic clients, which
    retry it with backoff, where OpenAI's say 503.
    """
    return 529 if exc.status == 503 else exc.status


def error_from(status: int, message: str) -> dict[str, Any]:
    """The Anthropic error envelope for ``status``; also the stream's error event."""
    kind = _TYPE_FOR_STATUS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def message_for(exc: CortexError) -> str:
    """``exc``'s message in this dialect's words, for the envelope and the error event.

    A too long prompt reads as Anthropic's API words it, ``prompt is too
    long: N tokens > M maximum``: Claude Code recognises that and compacts.
    """
    if isinstance(exc, ContextOverflow) and exc.prompt_tokens is not None:
        return f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx} maximum"
    return exc.message


def error_body(exc: CortexError) -> dict[str, Any]:
    body = error_from(status_for(exc), message_for(exc))
    if isinstance(exc, ThreadUnsupported):
        # Where the SDKs read it (``error.details.error_code``) to retry unthreaded.
        body["error"]["details"] = {"error_code": exc.code}
    return body
