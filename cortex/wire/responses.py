"""The OpenAI Responses dialect (``POST /v1/responses``): text and function calls.

A request's ``input`` items and ``instructions`` become ordinary chat
messages, and its function tools, also those grouped in ``namespace``
tools, chat tools, so the engine path is the chat one. Nothing is stored: a
``previous_response_id`` is refused, the client sends the whole conversation.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.errors import InvalidRequest
from cortex.wire import fields
from cortex.wire.openai import (
    CUSTOM_TOOLS,
    SamplingOverrides,
    Usage,
    chat_message,
    needs_tools,
    now,
    unsupported_content,
)

_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
#: Items that carry nothing a local model can use; dropped, not refused,
#: because clients replay them from earlier turns.
_IGNORED_ITEMS = frozenset({"reasoning"})
#: Content part types that carry text, and the key that holds it.
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


_ITEMS_SERVED = "messages, function_call, function_call_output and reasoning items"
_HOSTED_CALL = "it records a call of a hosted tool, and hosted tools run at OpenAI"
_BUILT_IN_CALL = (
    "it records a call of an OpenAI built-in tool, whose call format only OpenAI's models know"
)
#: Input item types cortex does not take: why, and what to do instead.
_ITEM_REFUSALS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        (
            "web_search_call",
            "file_search_call",
            "code_interpreter_call",
            "image_generation_call",
            "mcp_call",
            "mcp_list_tools",
            "mcp_approval_request",
            "mcp_approval_response",
            "tool_search_call",
            "tool_search_output",
        ),
        (_HOSTED_CALL, "leave it out of input"),
    ),
    **dict.fromkeys(
        (
            "local_shell_call",
            "local_shell_call_output",
            "shell_call",
            "shell_call_output",
            "apply_patch_call",
            "apply_patch_call_output",
            "computer_call",
            "computer_call_output",
        ),
        (_BUILT_IN_CALL, "leave it out, and declare the tool as a function tool"),
    ),
    **dict.fromkeys(
        ("custom_tool_call", "custom_tool_call_output"),
        (CUSTOM_TOOLS, "leave it out, and declare the tool as a function tool"),
    ),
    "compaction": (
        "it holds history that OpenAI compacted and encrypted, which only OpenAI can read",
        "start a new conversation, or compact it on the client",
    ),
    "item_reference": (
        "it names a stored item, and cortex stores nothing",
        "send the item itself",
    ),
}


def _text_of_parts(parts: list[Any], where: str, model: str) -> str:
    """Responses content parts -> the chat turn's text; any other part is refused."""
    texts = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise InvalidRequest(f"{here} must be an object with a type", param=here)
        key = _TEXT_PARTS.get(kind)
        if key is None:
            raise unsupported_content(kind, model=model, where=here)
        if not isinstance(part.get(key), str):
            raise InvalidRequest(f"{here}.{key} must be a string", param=f"{here}.{key}")
        texts.append(part[key])
    return "".join(texts)


def _content(item: Mapping[str, Any], key: str, where: str, model: str) -> str:
    content = item.get(key)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _text_of_parts(content, f"{where}.{key}", model)
    raise InvalidRequest(
        f"{where}.{key} must be a string or a list of parts", param=f"{where}.{key}"
    )


def _input_messages(body: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = fields.opt_str(body, "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if items is None:
        raise InvalidRequest("input: field required", param="input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        raise InvalidRequest("input must be a string or a list of items", param="input")
    unanswered: dict[str, None] = {}  # the call_ids of function_call items, in order
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise InvalidRequest(f"{where}.type must be a string", param=f"{where}.type")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _MESSAGE_ROLES:
                raise InvalidRequest(
                    f"{where}.role must be one of user, assistant, system, developer",
                    param=f"{where}.role",
                )
            messages.append({"role": role, "content": _content(item, "content", where, model)})
        elif kind == "function_call":
            call = _function_call(item, where)
            unanswered[call["id"]] = None
            last = messages[-1] if messages else None
            # Parallel calls (and a text reply before them) are one
            # assistant turn in chat form.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{where}.call_id must be a string", param=f"{where}.call_id")
            # As at OpenAI: an output answers an earlier call of the input, once.
            if call_id not in unanswered:
                raise InvalidRequest(
                    f"No tool call found for function call output with call_id {call_id}.",
                    param="input",
                )
            del unanswered[call_id]
            output = _content(item, "output", where, model)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind in _IGNORED_ITEMS:
            continue
        else:
            why, todo = _ITEM_REFUSALS.get(kind, (None, "leave it out"))
            raise fields.unsupported_type(
                where, "input item", kind, serves=_ITEMS_SERVED, why=why, todo=todo
            )
    if unanswered:
        raise InvalidRequest(
            f"No tool output found for function call {next(iter(unanswered))}.", param="input"
        )
    if not any(m["role"] != "system" for m in messages):
        raise InvalidRequest("input must not be empty", param="input")
    return [chat_message(m, f"input(converted)[{i}]", model=model) for i, m in enumerate(messages)]


def _function_call(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name = item.get("call_id"), item.get("name")
    arguments = item.get("arguments", "")
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise InvalidRequest(f"{where}: function_call needs call_id and name", param=where)
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    namespace = item.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str):
            raise InvalidRequest(f"{where}.namespace must be a string", param=f"{where}.namespace")
        name = f"{namespace}.{name}"  # as the model sees the function (see _namespace)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


_HOSTED = "hosted tools run at OpenAI"
_BUILT_IN = "OpenAI's built-in tools have a call format only OpenAI's models know"
_NO_WEB_SEARCH = "remove it; for Codex: -c web_search='\"disabled\"'"
#: Tool types cortex does not serve: why, and what to do instead.
_TOOL_REFUSALS: dict[str, tuple[str, str]] = {
    "web_search": (_HOSTED, _NO_WEB_SEARCH),
    "web_search_preview": (_HOSTED, _NO_WEB_SEARCH),
    **dict.fromkeys(
        ("file_search", "code_interpreter", "image_generation", "mcp", "tool_search"),
        (_HOSTED, "remove it"),
    ),
    **dict.fromkeys(
        ("local_shell", "shell", "apply_patch", "computer", "computer_use_preview"),
        (_BUILT_IN, "remove it, or declare the tool as a function tool"),
    ),
    "custom": (CUSTOM_TOOLS, "remove it, or declare it as a function tool with a JSON schema"),
}


def _refuse_tool(kind: Any, where: str, *, serves: str = "only function tools") -> InvalidRequest:
    why, todo = _TOOL_REFUSALS.get(kind, (None, "remove it"))
    return fields.unsupported_type(where, "tool", kind, serves=serves, why=why, todo=todo)


def _function(tool: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A Responses function tool -> its chat ``function``."""
    if not isinstance(tool.get("name"), str):
        raise InvalidRequest(f"{where}.name must be a string", param=f"{where}.name")
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {}}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return function


def _namespace(tool: Mapping[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    """A ``namespace`` tool: its name and its functions, named as the model sees them.

    The model sees ``<namespace>.<function>`` (as OpenAI's own models address
    a namespace's functions), with the namespace's description before the
    function's own. A dot is in no function name OpenAI's API accepts, so
    the names cannot meet a top-level tool's.
    """
    name, tools = tool.get("name"), tool.get("tools")
    if not isinstance(name, str) or not name or "." in name:
        raise InvalidRequest(
            f"{where}.name must be a non-empty string without '.'", param=f"{where}.name"
        )
    if not isinstance(tools, list):
        raise InvalidRequest(f"{where}.tools must be a list", param=f"{where}.tools")
    about = tool.get("description")
    functions = []
    for j, inner in enumerate(tools):
        here = f"{where}.tools[{j}]"
        kind = inner.get("type") if isinstance(inner, dict) else None
        if kind != "function":
            raise _refuse_tool(kind, here, serves="only function tools, in a namespace too")
        function = _function(inner, here)
        function["name"] = f"{name}.{function['name']}"
        if isinstance(about, str) and about:
            own = function.get("description")
            function["description"] = f"{about}\n\n{own}" if own else about
        functions.append(function)
    return name, functions


def _tools(
    body: Mapping[str, Any],
) -> tuple[list[dict[str, Any]] | None, dict[str, tuple[str, str]]]:
    """The request's tools as chat tools, and the namespaced ones' names.

    Returns:
      The chat tools (None: the request has none), and for each function of a
      ``namespace`` tool, its name as the model sees it -> (namespace, name).

    Raises:
      InvalidRequest: a tool type other than function and namespace, or two
        tools the model would see under one name.
    """
    tools = body.get("tools")
    if tools is None:
        return None, {}
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    converted: list[dict[str, Any]] = []
    namespaced: dict[str, tuple[str, str]] = {}
    declared: dict[str, str] = {}  # name the model sees -> where it was declared
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = tool.get("type")
        if kind == "function":
            found = [(where, _function(tool, where))]
        elif kind == "namespace":
            namespace, functions = _namespace(tool, where)
            found = [(f"{where}.tools[{j}]", f) for j, f in enumerate(functions)]
            for function in functions:
                namespaced[function["name"]] = (namespace, function["name"][len(namespace) + 1 :])
        else:
            raise _refuse_tool(kind, where)
        for here, function in found:
            name = function["name"]
            if name in declared:
                # Two tools under one name: the model could not tell them apart.
                raise InvalidRequest(
                    f"{here}: the model would see this tool as {name!r}, "
                    f"as it sees {declared[name]}: give each tool its own name",
                    param=f"{here}.name",
                )
            declared[name] = here
            converted.append({"type": "function", "function": function})
    return converted, namespaced


def _tool_choice(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    named = isinstance(choice, dict) and choice.get("type") == "function"
    if named and isinstance(choice.get("name"), str):
        name, namespace = choice["name"], choice.get("namespace")
        if isinstance(namespace, str):  # as a function_call names it
            name = f"{namespace}.{name}"
        return {"type": "function", "function": {"name": name}}
    raise InvalidRequest(
        'tool_choice must be none, auto, required or {"type": "function", "name": ...}',
        param="tool_choice",
    )


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("text must be an object", param="text")
    fmt = text.get("format") if text is not None else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(
        "text.format.type must be text, json_object or json_schema with a schema",
        param="text.format",
    )


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", param="metadata")
    return metadata


def _echo_defaults() -> dict[str, Any]:
    """What a response object says of the request when the request left it out.

    ``temperature`` and ``top_p`` are OpenAI's defaults, which are also what
    the neuron samples with when a request names neither.
    """
    return {
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "max_output_tokens": None,
        "max_tool_calls": None,
        "temperature": 1.0,
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "user": None,
        "background": False,
    }


def _echo(body: Mapping[str, Any], req: ResponsesRequest) -> dict[str, Any]:
    """The request's fields as the response object repeats them (Responses shapes)."""
    used = req.sampling.apply({})
    sent = {
        "instructions": fields.opt_str(body, "instructions"),
        "metadata": _metadata(body),
        "parallel_tool_calls": fields.opt_bool(body, "parallel_tool_calls"),
        "tool_choice": body.get("tool_choice"),
        "tools": body.get("tools"),
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        # What the neuron samples with: the gateway has filled in the
        # catalogue's defaults, Sampling's are OpenAI's.
        "temperature": used.temperature,
        "top_p": used.top_p,
        "text": body.get("text"),
        "user": req.user,
    }
    defaults = _echo_defaults()
    return {key: defaults[key] if value is None else value for key, value in sent.items()}


@attrs.frozen
class ResponsesRequest:
    """A validated ``POST /v1/responses`` body, already in chat terms.

    ``messages``, ``tools``, ``tool_choice`` and ``response_format`` have the
    chat completions shapes.
    """

    model: str
    messages: list[dict[str, Any]]
    max_output_tokens: int | None = None
    sampling: SamplingOverrides = attrs.field(factory=SamplingOverrides)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    user: str | None = None
    #: The most function calls the answer holds; those the model writes
    #: beyond are dropped. None: no limit.
    max_tool_calls: int | None = None
    #: What the response object repeats of the request (``instructions``,
    #: ``metadata``, ``tools`` as sent, ...): see ``response_object``.
    echo: dict[str, Any] = attrs.field(factory=_echo_defaults)
    #: The functions of ``namespace`` tools: the name the model sees
    #: (``<namespace>.<function>``) -> (namespace, function name).
    namespaced: dict[str, tuple[str, str]] = attrs.field(factory=dict)

    def called(self, name: str) -> tuple[str, str | None]:
        """The function the model called by ``name``: (its name, its namespace or None)."""
        return _called(self.namespaced, name)


def _called(namespaced: Mapping[str, tuple[str, str]], name: str) -> tuple[str, str | None]:
    namespace, function = namespaced.get(name, (None, name))
    return function, namespace


_NOT_STORED = "responses are not stored, send the whole conversation in input"
#: Fields that name state the gateway does not keep, each refused with why.
_STORED_STATE = {
    "previous_response_id": f"previous_response_id is not supported: {_NOT_STORED}",
    "conversation": f"conversation is not supported: {_NOT_STORED}",
    "prompt": "prompt (a stored prompt template) is not supported: prompts and "
    f"{_NOT_STORED} and its instructions in instructions",
}
_OUTPUT_LOGPROBS = "message.output_text.logprobs"


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    """Refuse what no engine here honours, naming the field (as chat does)."""
    for key, why in _STORED_STATE.items():
        if body.get(key) is not None:
            raise InvalidRequest(why, param=key)
    if fields.opt_bool(body, "background"):
        raise InvalidRequest(
            "background is not supported: cortex answers synchronously, "
            "leave background out or false",
            param="background",
        )
    top_logprobs = fields.opt_int(body, "top_logprobs", minimum=0, maximum=20)
    if top_logprobs:
        raise InvalidRequest("top_logprobs is not supported", param="top_logprobs")
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
            raise InvalidRequest("include must be a list of strings", param="include")
        # The others name output of tools cortex refuses, or reasoning it has
        # none of: clients send them routinely, nothing to add.
        if _OUTPUT_LOGPROBS in include:
            raise InvalidRequest(
                f"include {_OUTPUT_LOGPROBS}: logprobs is not supported", param="include"
            )


def _tool_call_limit(
    body: Mapping[str, Any], tool_choice: str | dict[str, Any] | None, parallel: bool | None
) -> tuple[int | None, str | dict[str, Any] | None, bool | None]:
    """``max_tool_calls``, and the ``tool_choice`` and ``parallel_tool_calls`` it implies.

    0 hides the tools from the model (``tool_choice`` none), 1 asks for one
    call at a time; any limit also drops the calls the model writes beyond it.

    Raises:
      InvalidRequest: 0 with a ``tool_choice`` that forces a call.
    """
    limit = fields.opt_int(body, "max_tool_calls", minimum=0, maximum=fields.MAX_TOKENS)
    if limit == 0:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest(
                "max_tool_calls 0 allows no call, but tool_choice forces one",
                param="max_tool_calls",
            )
        return limit, "none", parallel
    if limit == 1:
        return limit, tool_choice, False
    return limit, tool_choice, parallel


def parse_responses_request(body: Any) -> ResponsesRequest:
    """Validate a decoded Responses body and convert its input to chat messages.

    Raises:
      InvalidRequest: on a malformed body, tools other than functions (also
        in namespaces), two tools under one name, input items other than
        messages, function calls and their outputs, state the
        gateway does not keep (``previous_response_id``, ``conversation``,
        ``prompt``), or what no engine here does (``background``, logprobs).
    """
    body = fields.require_object(body)
    model = fields.model(body)
    _reject_unsupported(body)
    (tools, namespaced), tool_choice = _tools(body), _tool_choice(body)
    needs_tools(tool_choice, tools)
    max_tool_calls, tool_choice, parallel_tool_calls = _tool_call_limit(
        body, tool_choice, fields.opt_bool(body, "parallel_tool_calls")
    )
    req = ResponsesRequest(
        model=model,
        messages=_input_messages(body, model),
        max_output_tokens=fields.opt_tokens(body, "max_output_tokens"),
        sampling=SamplingOverrides.from_body(body),
        stream=bool(fields.opt_bool(body, "stream")),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        response_format=_response_format(body),
        store=fields.opt_bool(body, "store"),
        user=fields.opt_str(body, "user"),
        max_tool_calls=max_tool_calls,
        namespaced=namespaced,
    )
    return attrs.evolve(req, echo=_echo(body, req))


# -- output -------------------------------------------------------------------


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(16)}"


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(16)}"


def usage_object(usage: Usage) -> dict[str, Any]:
    """Responses usage; cortex reasons in no hidden tokens and writes the
    prompt cache for free, so those details are 0."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(message_id: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def _response(
    *,
    id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    error: dict[str, Any] | None = None,
    echo: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": error,
        "incomplete_details": (
            {"reason": incomplete_reason} if incomplete_reason is not None else None
        ),
        **_echo_defaults(),
        **(echo or {}),
        "usage": usage,
    }


def _failed(response: Mapping[str, Any], message: str, code: str) -> dict[str, Any]:
    """``response`` as ``response.failed`` carries it: the error, no output, no usage.

    The output so far is left out: the client has it from the events.
    """
    return {
        **response,
        "status": "failed",
        "output": [],
        "error": {"code": code, "message": message},
        "incomplete_details": None,
        "usage": None,
    }


def new_function_call_id() -> str:
    return f"fc_{secrets.token_hex(16)}"


def function_call_item(
    *,
    id: str,
    call_id: str,
    name: str,
    arguments: str,
    status: str = "completed",
    namespace: str | None = None,
) -> dict[str, Any]:
    """A ``function_call`` output item: a tool call the client should run.

    Args:
      name: the function's own name, without its namespace.
      namespace: the ``namespace`` tool it belongs to; None: a top-level function.
    """
    item = {
        "type": "function_call",
        "id": id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
    if namespace is not None:
        item["namespace"] = namespace
    return item


def response_object(
    *,
    id: str,
    created_at: int,
    model: str,
    text: str,
    status: str,
    usage: Usage,
    incomplete_reason: str | None,
    message_id: str,
    function_calls: list[dict[str, Any]] | None = None,
    echo: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole ``response``: one assistant message, then any ``function_calls``.

    Args:
      echo: the request's ``ResponsesRequest.echo``, repeated in the object
        as OpenAI's are; None: the defaults.
      status: ``completed`` or ``incomplete``.
      incomplete_reason: ``max_output_tokens`` when the output was cut, else None.
      function_calls: :func:`function_call_item` values; with them, an empty
        ``text`` leaves the message out.
    """
    item_status = "completed" if status == "completed" else "incomplete"
    output = []
    if text or not function_calls:
        output.append(_message_item(message_id, item_status, [_text_part(text)]))
    output += function_calls or []
    return _response(
        id=id,
        created_at=created_at,
        model=model,
        status=status,
        output=output,
        usage=usage_object(usage),
        incomplete_reason=incomplete_reason,
        echo=echo,
    )


class ResponsesStream:
    """Builds a Responses event stream: assistant text and function calls.

    Each method returns ``(event name, payload)`` pairs to encode with
    ``sse.encode(payload, event=name)``; payloads carry ``type`` and an
    increasing ``sequence_number``. The order is the one the SDK's stream
    helper checks: created, in_progress, then per output item: item added,
    (part added, text deltas, text done, part done | argument deltas,
    arguments done), item done; then completed. One item is open at a time:
    text after a function call opens a new message.
    """

    def __init__(
        self,
        *,
        id: str,
        created_at: int,
        model: str,
        message_id: str | None = None,
        echo: Mapping[str, Any] | None = None,
        max_tool_calls: int | None = None,
        namespaced: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self.id = id
        self.created_at = created_at
        self.model = model
        #: The request's fields every response snapshot repeats (``ResponsesRequest.echo``).
        self.echo = echo
        self.message_id = message_id or new_message_id()
        self._sequence = 0
        self._items: list[dict[str, Any]] = []  # finished output items
        self._text: list[str] | None = None  # the open message's text
        self._call: dict[str, Any] | None = None  # the open function call
        self._arguments: list[str] = []
        self._status = "completed"
        #: Function calls beyond this many are dropped (``ResponsesRequest.max_tool_calls``).
        self.max_tool_calls = max_tool_calls
        self._calls = 0
        #: ``ResponsesRequest.namespaced``: calls of these names are a namespace's.
        self.namespaced = namespaced or {}

    @property
    def _index(self) -> int:
        return len(self._items)

    def _event(self, kind: str, /, **fields: Any) -> tuple[str, dict[str, Any]]:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return kind, payload

    def _snapshot(self, status: str) -> dict[str, Any]:
        return _response(
            id=self.id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=[],
            echo=self.echo,
        )

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    def _open(self) -> list[tuple[str, dict[str, Any]]]:
        if self._text is not None:
            return []
        events = self._close()
        if any(item["type"] == "message" for item in self._items):
            self.message_id = new_message_id()
        self._text = []
        # The message and its part open with the first text, not at start:
        # an early empty item would fake the time to first token.
        return [
            *events,
            self._event(
                "response.output_item.added",
                output_index=self._index,
                item=_message_item(self.message_id, "in_progress", []),
            ),
            self._event(
                "response.content_part.added",
                item_id=self.message_id,
                output_index=self._index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        """Close the open item, if any."""
        item_status = "completed" if self._status == "completed" else "incomplete"
        if self._text is not None:
            text = "".join(self._text)
            item = _message_item(self.message_id, item_status, [_text_part(text)])
            events = [
                self._event(
                    "response.output_text.done",
                    item_id=self.message_id,
                    output_index=self._index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done",
                    item_id=self.message_id,
                    output_index=self._index,
                    content_index=0,
                    part=_text_part(text),
                ),
                self._event("response.output_item.done", output_index=self._index, item=item),
            ]
            self._text = None
        elif self._call is not None:
            arguments = "".join(self._arguments)
            item = {**self._call, "arguments": arguments, "status": item_status}
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=self._index,
                    name=item["name"],
                    arguments=arguments,
                ),
                self._event("response.output_item.done", output_index=self._index, item=item),
            ]
            self._call = None
        else:
            return []
        self._items.append(item)
        return events

    def delta(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        if not text:
            return []
        events = self._open()
        assert self._text is not None
        self._text.append(text)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self.message_id,
                output_index=self._index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def function_call(
        self, *, call_id: str, name: str, item_id: str | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Open a ``function_call`` item; its arguments follow as :meth:`arguments`.

        A call beyond ``max_tool_calls`` opens nothing: it and its arguments are dropped.
        """
        events = self._close()
        if self.max_tool_calls is not None and self._calls >= self.max_tool_calls:
            return events
        self._calls += 1
        function, namespace = _called(self.namespaced, name)
        self._call = function_call_item(
            id=item_id or new_function_call_id(),
            call_id=call_id,
            name=function,
            arguments="",
            status="in_progress",
            namespace=namespace,
        )
        self._arguments = []
        events.append(
            self._event("response.output_item.added", output_index=self._index, item=self._call)
        )
        return events

    def arguments(self, delta: str) -> list[tuple[str, dict[str, Any]]]:
        """A piece of the open function call's arguments."""
        if not delta or self._call is None:
            return []
        self._arguments.append(delta)
        return [
            self._event(
                "response.function_call_arguments.delta",
                item_id=self._call["id"],
                output_index=self._index,
                delta=delta,
            )
        ]

    def finish(
        self, *, usage: Usage, status: str = "completed", incomplete_reason: str | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Close the open item and end with ``response.completed`` or ``.incomplete``."""
        self._status = status
        events = self._open() if not self._items and self._call is None else []
        events += self._close()
        final = _response(
            id=self.id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=self._items,
            usage=usage_object(usage),
            incomplete_reason=incomplete_reason,
            echo=self.echo,
        )
        name = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(name, response=final))
        return events

    def fail(self, message: str, code: str = "server_error") -> list[tuple[str, dict[str, Any]]]:
        """End a stream that broke mid-way with ``response.failed`` (an empty ``output``)."""
        failed = _failed(self._snapshot("failed"), message, code)
        return [self._event("response.failed", response=failed)]

    def adopt(self, payload: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """An event of the engine's own stream of this response, after :meth:`start`.

        For a stream begun before the engine's first event (the gateway
        starts a slow one early): the engine's ``response.created`` and
        ``response.in_progress`` are dropped, :meth:`start` sent them; its
        other events take this stream's id, ``created_at`` and next
        sequence numbers, so the client sees one response, numbered
        without a gap.
        """
        kind = payload["type"]
        if kind in ("response.created", "response.in_progress"):
            return []
        fields = {k: v for k, v in payload.items() if k not in ("type", "sequence_number")}
        response = fields.get("response")
        if isinstance(response, dict):
            fields["response"] = {**response, "id": self.id, "created_at": self.created_at}
        return [self._event(kind, **fields)]


_SEQUENCE = re.compile(r'"sequence_number"\s*:\s*(\d+)')


class RelayedResponse:
    """An engine's Responses stream passed through as it came, watched for how to end it.

    When the relay has to end such a stream itself (the engine failed
    mid-way, a timeout, a shutdown), its ``response.failed`` must name the
    engine's response and number on from the last event relayed. Cheaply:
    each event's data is only searched for its ``sequence_number``, and
    only the first event that carries a ``response`` (``response.created``)
    is decoded.
    """

    def __init__(self, *, model: str) -> None:
        #: The model named when no event has named the response.
        self.model = model
        #: The response as the first lifecycle event had it; None: none seen.
        self.response: dict[str, Any] | None = None
        #: The next event's ``sequence_number``.
        self.sequence = 0

    def see(self, data: str) -> None:
        """The data of one event relayed."""
        found = _SEQUENCE.search(data)
        if found is not None:
            self.sequence = int(found.group(1)) + 1
        if self.response is None and '"response"' in data:
            try:
                payload = json.loads(data)
            except ValueError:
                return
            response = payload.get("response") if isinstance(payload, dict) else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.response = response

    def fail(self, message: str, code: str = "server_error") -> list[tuple[str, dict[str, Any]]]:
        """``response.failed`` for the response relayed so far, numbered on from it."""
        response = self.response or _response(
            id=new_response_id(), created_at=now(), model=self.model, status="failed", output=[]
        )
        payload = {
            "type": "response.failed",
            "sequence_number": self.sequence,
            "response": _failed(response, message, code),
        }
        self.sequence += 1
        return [("response.failed", payload)]
