"""The OpenAI dialect: chat completions, completions, models, errors.

Parsing turns a decoded JSON body into a frozen request value or raises
``InvalidRequest`` naming the offending ``param``; builders return plain
dicts in the shapes the ``openai`` SDK parses. Streams are the caller's
business: it encodes the chunk dicts with :mod:`cortex.wire.sse`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.errors import CortexError, InvalidRequest, ServiceError, error_for_status
from cortex.harness import Sampling
from cortex.wire import fields
from cortex.wire.fields import Integer, Number, real, whole

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
#: Content part types that carry text, and the key that holds it.
TEXT_PARTS = {"text": "text", "refusal": "refusal"}

_MISSING = object()


def new_id(prefix: str) -> str:
    """A fresh id like ``chatcmpl-<24 hex>``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix seconds, for ``created`` fields."""
    return int(time.time())


# -- field checks -------------------------------------------------------------
# The shared ones (model, opt_int, ...) are in cortex.wire.fields.


def _stop(body: Mapping[str, Any], key: str = "stop") -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"{key} must be a string or a list of strings", param=key)
    # More than OpenAI's 4: a translated Anthropic request may hold more.
    fields.check_stop_count(value, key)
    # An empty stop string would end every generation before it starts.
    return tuple(s for s in value if s)


def _reject_n(body: Mapping[str, Any]) -> None:
    n = fields.opt_int(body, "n", minimum=1)
    if n is not None and n > 1:
        raise InvalidRequest("n > 1 is not supported", param="n")


# -- sampling -----------------------------------------------------------------

_SAMPLING_DEFAULTS = {f.name: f.default for f in attrs.fields(Sampling)}


def _optional(validator: Any) -> Any:
    return attrs.validators.optional(validator)


def _float_field(low: float, high: float | None = None) -> Any:
    return attrs.field(default=None, converter=real, validator=_optional(Number(low, high)))


def _int_field(low: int, high: int) -> Any:
    return attrs.field(default=None, converter=whole, validator=_optional(Integer(low, high)))


@attrs.frozen
class SamplingOverrides:
    """Sampling fields the client sent; None means it did not send that one.

    Each field's type and range is its validator: constructing one from a
    body is validating it.
    """

    temperature: float | None = _float_field(0, 2)
    #: 0 keeps only the most likely token (greedy), in llama.cpp's and
    #: ctransformers' samplers alike, as clients that send it expect.
    top_p: float | None = _float_field(0, 1)
    top_k: int | None = _int_field(0, fields.MAX_TOKENS)
    min_p: float | None = _float_field(0, 1)
    repeat_penalty: float | None = _float_field(0)
    presence_penalty: float | None = _float_field(-2, 2)
    frequency_penalty: float | None = _float_field(-2, 2)
    seed: int | None = _int_field(*fields.SEED_RANGE)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SamplingOverrides:
        """Read and range-check the OpenAI fields plus llama.cpp's extras.

        Raises:
          InvalidRequest: a field of the wrong type or out of its range.
        """
        return cls(**{field.name: body.get(field.name) for field in attrs.fields(cls)})

    def apply(self, defaults: Mapping[str, Any]) -> Sampling:
        """The settings to generate with.

        Each field is the client's value, else the model's default from
        ``defaults`` (the catalogue's per-model sampling), else
        :class:`Sampling`'s own default.
        """
        values = {}
        for field in attrs.fields(SamplingOverrides):
            value = getattr(self, field.name)
            if value is None:
                value = defaults.get(field.name)
            if value is None:
                value = _SAMPLING_DEFAULTS[field.name]
            values[field.name] = value
        return Sampling(**values)


# -- chat completions ---------------------------------------------------------


def unsupported_content(kind: str, *, model: str, where: str) -> InvalidRequest:
    """The 400 for a content block that no model here can take.

    Engines render a conversation to prompt text (``LoadedModel.render_chat``):
    an image, audio or a file cannot reach any model, and dropping it would
    answer a question the client did not ask. Each dialect names the block by
    its own type and place.
    """
    return InvalidRequest(
        f"{where}: content block type {kind!r} is not supported by model {model!r}",
        param=where,
    )


def _content_text(parts: list[Any], param: str, model: str) -> str:
    """The text of content parts, joined by newlines; any other part is refused."""
    texts = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{where} must be an object with a type", param=where)
        key = TEXT_PARTS.get(part["type"])
        if key is None:
            raise unsupported_content(part["type"], model=model, where=where)
        if not isinstance(part.get(key), str):
            raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
        texts.append(part[key])
    return "\n".join(texts)


def _tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequest(f"{param} must be a list", param=param)
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.function.name must be a string", param=where)
        if not isinstance(function.get("arguments", ""), str):
            raise InvalidRequest(f"{where}.function.arguments must be a JSON string", param=where)


def _messages(body: Mapping[str, Any], *, continuing: bool) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages: field required", param="messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list", param="messages")
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    model = fields.model(body)
    checked = [chat_message(m, f"messages[{i}]", model=model) for i, m in enumerate(messages)]
    # A final assistant turn to continue is a prefill: its own rules
    # (``_continue_final_message``) say what it may hold.
    continued = continuing and checked[-1]["role"] == "assistant"
    _check_tool_results(checked[:-1] if continued else checked)
    return checked


def _unanswered(ids: list[str], param: str) -> InvalidRequest:
    return InvalidRequest(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(ids),
        param=param,
    )


def _check_tool_results(messages: list[dict[str, Any]]) -> None:
    """Refuse tool results that answer no call, and calls left without a result.

    As at OpenAI: the ``tool`` messages right after an assistant turn with
    ``tool_calls`` answer those calls, one each, before any other message.
    The model would otherwise read a result of nothing, or a call whose
    result never came. Calls without an id cannot be paired: a turn with one
    is not held to its ids.

    Raises:
      InvalidRequest: in OpenAI's words, naming the message that breaks the rule.
    """
    calls: list[str] | None = None  # the ids of the turn the tool messages answer
    pending: list[str] = []
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            if calls is None:
                raise InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceding message with 'tool_calls'.",
                    param=f"messages[{i}].role",
                )
            call_id = message["tool_call_id"]
            if calls and call_id not in calls:
                raise InvalidRequest(
                    f"Invalid parameter: 'tool_call_id' of {json.dumps(call_id)} not found in "
                    "'tool_calls' of previous message.",
                    param=f"messages[{i}].tool_call_id",
                )
            pending = [p for p in pending if p != call_id]
            continue
        if pending:
            raise _unanswered(pending, f"messages[{i}].role")
        tool_calls = message.get("tool_calls") if message["role"] == "assistant" else None
        calls = None
        if tool_calls:
            ids = [call.get("id") for call in tool_calls]
            calls = ids if all(isinstance(call_id, str) for call_id in ids) else []
            pending = list(calls)
    if pending:
        raise _unanswered(pending, "messages")


def chat_message(message: Any, where: str, *, model: str) -> dict[str, Any]:
    """A checked chat message, as every chat template takes it.

    Content parts become one string (a template that expects a string would
    print the list), a null content is ``""`` unless the turn carries tool
    calls, and a ``developer`` turn becomes ``system``, the role
    OpenAI renamed: templates know only the old name, and some drop turns
    whose role they do not know.

    Raises:
      InvalidRequest: a malformed message, or content that is not text.
    """
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, "
            f"got {fields.shown(role)}",
            param=f"{where}.role",
        )
    content = message.get("content")
    # Only an assistant turn may omit content (when it carries tool calls).
    if content is None and role != "assistant":
        raise InvalidRequest(f"{where}.content: field required", param=f"{where}.content")
    if content is None and not message.get("tool_calls"):
        # An empty turn: templates print None as "None" or fail on it.
        content = ""
    if isinstance(content, list):
        content = _content_text(content, f"{where}.content", model)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of parts", param=f"{where}.content"
        )
    if role == "assistant" and message.get("tool_calls") is not None:
        _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(
            f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id"
        )
    return {**message, "role": "system" if role == "developer" else role, "content": content}


#: Why a custom tool (OpenAI's, chat and Responses alike) is refused.
CUSTOM_TOOLS = (
    "custom tools take free-form text, which a local model's tool-call markup cannot carry"
)


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = tool.get("type", "function")
        if kind != "function":
            raise fields.unsupported_type(
                where,
                "tool",
                kind,
                serves="only function tools",
                why=CUSTOM_TOOLS if kind == "custom" else None,
                todo="remove it, or declare it as a function tool with a JSON schema",
            )
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.function.name must be a string", param=where)
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidRequest(f"{where}.function.parameters must be an object", param=where)
    return tools


def _tool_choice(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                "tool_choice must be none, auto, required or a function", param="tool_choice"
            )
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(
            'tool_choice object must be {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return choice


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if (
        not isinstance(fmt, dict)
        or not isinstance(fmt.get("type"), str)
        or (fmt["type"] not in RESPONSE_FORMATS)
    ):
        raise InvalidRequest(
            "response_format.type must be one of text, json_object, json_schema",
            param="response_format",
        )
    if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise InvalidRequest(
            "response_format.json_schema must be an object", param="response_format.json_schema"
        )
    return fmt


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    include = fields.opt_bool(options, "include_usage")
    # Only a stream has a usage chunk to send.
    return bool(include) and stream


#: Chat fields no engine here honours, each refused with why: answering
#: without them would answer another question (text for audio, no search).
_UNSUPPORTED_CHAT = {
    "functions": "functions (the legacy form of tools) is not supported; send tools",
    "function_call": "function_call (the legacy form of tool_choice) is not supported; "
    "send tool_choice",
    "audio": "audio output is not supported: the models here answer in text",
    "web_search_options": "web search is not supported: the models here have no search tool",
    "prediction": "prediction (predicted outputs) is not supported",
}


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    for key, why in _UNSUPPORTED_CHAT.items():
        if body.get(key) is not None:
            raise InvalidRequest(why, param=key)
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise InvalidRequest("modalities must be a list of strings", param="modalities")
        if set(modalities) - {"text"}:
            raise InvalidRequest(
                f"modalities {fields.shown(modalities)} are not supported: "
                "the models here answer in text",
                param="modalities",
            )


def needs_tools(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> None:
    """Refuse a ``tool_choice`` that forces a call when there are no tools (as OpenAI does).

    Raises:
      InvalidRequest: ``required`` or a named function, and no tools.
    """
    if tools or choice is None or choice in ("none", "auto"):
        return
    what = "required" if choice == "required" else "a named function"
    raise InvalidRequest(
        f"tool_choice {what} needs tools: the request has none", param="tool_choice"
    )


def _reject_logprobs(body: Mapping[str, Any], key: str = "logprobs") -> None:
    # Chat sends `logprobs: false` routinely; only asking for them is refused.
    if body.get(key) not in (None, False):
        raise InvalidRequest(f"{key} is not supported", param=key)


def _continue_final_message(
    continuing: bool,
    messages: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None,
    response_format: dict[str, Any] | None,
) -> bool:
    """``continue_final_message`` (vLLM's extension), checked against the rest of the body.

    Raises:
      InvalidRequest: the last message is not a text-only assistant turn,
        or a forced tool call or a JSON format would have to shape an
        answer that begins inside the prefill.
    """
    if not continuing:
        return False
    where = f"messages[{len(messages) - 1}]"
    last = messages[-1]
    if last["role"] != "assistant":
        raise InvalidRequest(
            f"continue_final_message needs the last message to be an assistant turn to "
            f"continue; {where} is a {last['role']} turn",
            param="continue_final_message",
        )
    if last.get("tool_calls"):
        raise InvalidRequest(
            f"{where}.tool_calls: the assistant turn continue_final_message continues "
            "must be text only",
            param=f"{where}.tool_calls",
        )
    if tool_choice == "required" or isinstance(tool_choice, dict):
        raise fields.prefill_conflict("tool_choice", "a forced tool call")
    if response_format is not None and response_format["type"] != "text":
        kind = response_format["type"]
        raise fields.prefill_conflict("response_format", f"type {kind!r} (a JSON format)")
    return True


@attrs.frozen
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body.

    ``messages`` are the client's dicts as :func:`chat_message` returns them:
    content a string (None only on an assistant turn with tool calls).
    With ``continue_final_message`` the last one is an assistant turn whose
    text the answer continues (a prefill); without it, a final assistant
    turn is a finished turn, as at OpenAI.
    """

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    sampling: SamplingOverrides = attrs.field(factory=SamplingOverrides)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    #: Validated, not applied: no engine here biases logits.
    logit_bias: dict[str, float] | None = attrs.field(
        default=None, validator=_optional(fields.logit_bias)
    )
    continue_final_message: bool = False


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded chat completions body.

    Raises:
      InvalidRequest: anything the engine cannot honour or the body gets wrong.
    """
    body = fields.require_object(body)
    model = fields.model(body)
    continuing = bool(fields.opt_bool(body, "continue_final_message"))
    messages = _messages(body, continuing=continuing)
    _reject_n(body)
    _reject_logprobs(body)
    _reject_unsupported(body)
    tools, tool_choice = _tools(body), _tool_choice(body)
    needs_tools(tool_choice, tools)
    max_tokens = fields.opt_tokens(body, "max_tokens")
    # Benchmark tools send only max_completion_tokens; it wins when both come.
    max_completion = fields.opt_tokens(body, "max_completion_tokens")
    stream = bool(fields.opt_bool(body, "stream"))
    response_format = _response_format(body)
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=_include_usage(body, stream),
        sampling=SamplingOverrides.from_body(body),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=fields.opt_bool(body, "parallel_tool_calls"),
        response_format=response_format,
        user=fields.opt_str(body, "user"),
        logit_bias=body.get("logit_bias"),
        continue_final_message=_continue_final_message(
            continuing, messages, tool_choice, response_format
        ),
    )


# -- completions --------------------------------------------------------------


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= fields.MAX_TOKENS
            for t in value
        )
    )


def _prompts(body: Mapping[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise InvalidRequest("prompt: field required", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if _is_tokens(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_tokens(p) for p in prompt):
            return list(prompt)
    raise InvalidRequest(
        "prompt must be a string, a list of strings, a list of token ids "
        "or a list of token id lists (token ids are non-negative integers)",
        param="prompt",
    )


@attrs.frozen
class CompletionRequest:
    """A validated ``POST /v1/completions`` body; one choice per prompt."""

    model: str
    prompts: list[str | list[int]]
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    sampling: SamplingOverrides = attrs.field(factory=SamplingOverrides)
    user: str | None = None
    #: Validated, not applied: no engine here biases logits.
    logit_bias: dict[str, float] | None = attrs.field(
        default=None, validator=_optional(fields.logit_bias)
    )


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded completions body.

    ``echo``, ``suffix``, ``logprobs`` and ``best_of`` > 1 are refused rather
    than ignored: a client that asks for them reads the answer differently.

    Raises:
      InvalidRequest: as for :func:`parse_chat_request`.
    """
    body = fields.require_object(body)
    model = fields.model(body)
    prompts = _prompts(body)
    _reject_n(body)
    if fields.opt_bool(body, "echo"):
        raise InvalidRequest("echo is not supported", param="echo")
    if fields.opt_str(body, "suffix"):
        raise InvalidRequest("suffix is not supported", param="suffix")
    if body.get("logprobs") is not None:
        raise InvalidRequest("logprobs is not supported", param="logprobs")
    best_of = fields.opt_int(body, "best_of", minimum=1)
    if best_of is not None and best_of > 1:
        raise InvalidRequest("best_of > 1 is not supported", param="best_of")
    # Like OpenAI, an absent or null max_tokens means 16.
    max_tokens = fields.opt_tokens(body, "max_tokens")
    stream = bool(fields.opt_bool(body, "stream"))
    return CompletionRequest(
        model=model,
        prompts=prompts,
        max_tokens=16 if max_tokens is None else max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=_include_usage(body, stream),
        sampling=SamplingOverrides.from_body(body),
        user=fields.opt_str(body, "user"),
        logit_bias=body.get("logit_bias"),
    )


# -- responses ----------------------------------------------------------------


@attrs.frozen
class Usage:
    """Token counts of one request.

    ``cached_tokens`` are the prompt tokens read from the prompt cache
    instead of evaluated; they are part of ``prompt_tokens``, as OpenAI
    counts them.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def prompt_usage(usage: Usage) -> dict[str, Any]:
    """The prompt's part of a usage object: a stream's ``prompt_usage`` (cortex extension)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _with_stop_sequence(choice: dict[str, Any], stop_sequence: str | None) -> dict[str, Any]:
    # cortex extension: the client's stop string that ended the output, so
    # the gateway can answer Anthropic's stop_sequence honestly.
    if stop_sequence is not None:
        choice["stop_sequence"] = stop_sequence
    return choice


def chat_completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str | None,
    finish_reason: str,
    usage: Usage,
    tool_calls: list[dict[str, Any]] | None = None,
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_with_stop_sequence(choice, stop_sequence)],
        "usage": usage.to_openai(),
    }


def chat_chunk(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    stop_sequence: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; same ``id`` and ``created`` on every chunk.

    With ``include_usage`` the chunk carries ``usage: null``, as OpenAI's do
    when the client asked for a closing :func:`usage_chunk`.
    """
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [_with_stop_sequence(choice, stop_sequence)],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(*, id: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    """The last chunk before ``[DONE]`` when ``include_usage``: ``choices`` is ``[]``."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.to_openai(),
    }


def text_completion(
    *, id: str, created: int, model: str, choices: list[tuple[str, str]], usage: Usage
) -> dict[str, Any]:
    """A ``text_completion`` object; ``choices`` are (text, finish_reason) pairs."""
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}
            for i, (text, finish_reason) in enumerate(choices)
        ],
        "usage": usage.to_openai(),
    }


def completion_chunk(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    index: int = 0,
    finish_reason: str | None = None,
    stop_sequence: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion`` object (the same shape as the whole one)."""
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
    chunk: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [_with_stop_sequence(choice, stop_sequence)],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def model_entry(id: str, *, created: int, owned_by: str = "cortex", **extra: Any) -> dict[str, Any]:
    """One entry of ``GET /v1/models``; ``extra`` adds cortex's own fields."""
    return {"id": id, "object": "model", "created": created, "owned_by": owned_by, **extra}


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}


# -- errors -------------------------------------------------------------------


def error_body(exc: CortexError) -> dict[str, Any]:
    """The OpenAI error envelope for ``exc``; also the mid-stream error chunk."""
    return {
        "error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}
    }


def error_from(status: int, message: str) -> dict[str, Any]:
    """The envelope for an error that is no CortexError (a 404 route, a 405).

    A client error takes the kind of the class its status stands for; a
    server error is a ``server_error``, whatever its status.
    """
    exc = error_for_status(status, message) if status < 500 else ServiceError(message)
    return error_body(exc)
