"""Anthropic messages <-> OpenAI chat completions, for the gateway.

Requests go in as chat completions bodies (the one engine path); answers
come back as Anthropic messages or, streaming, as Anthropic events built
from the chat chunks by :class:`AnthropicStream`.

Choices made where the two dialects do not line up:

- Several text blocks of one turn (or of ``system``) are joined with "\\n";
  a plain-text ``document`` is text too.
- ``output_config.format`` (structured output, ``messages.parse``) becomes
  a ``json_schema`` ``response_format``: the neuron constrains the answer
  to the schema, and the answer is its one text block.
- ``tool_result`` content that is an error is prefixed with ``"Error: "``.
- ``thinking``, ``redacted_thinking`` and server-tool blocks from earlier
  turns are dropped: a local model cannot use them.
- Any other block (``image``, a PDF ``document``, a type this module does
  not know), anywhere in the request, is refused with a 400 that names its
  type and place: the models take text only, and answering without it would
  answer another question.
- A tool call's ``input`` is its arguments read as the SDKs read a
  streamed ``input_json_delta`` (``jiter``'s partial mode): arguments cut
  short (``max_tokens`` ended the call) keep their complete members and
  drop the unfinished one, ``{"city": "Paris", "unit": "cel`` is
  ``{"city": "Paris"}``, so a whole answer and a stream give the same
  input. Arguments that are not a JSON object at all give ``{}``.
- Usage: the neuron's ``prompt_tokens_details.cached_tokens`` becomes
  ``cache_read_input_tokens`` and ``input_tokens`` the rest of the prompt,
  as Anthropic counts them. ``cache_creation_input_tokens`` is always 0:
  a neuron caches every prompt by itself, at no extra cost, so nothing is
  a paid cache write. ``cache_control`` marks in the request are ignored.
  Streaming, ``message_start`` waits for the neuron's first chunk, whose
  ``prompt_usage`` (a cortex extension) has the split, so it says what
  ``message_delta`` says. From a neuron that sends none it carries the
  gateway's count of the prompt as ``input_tokens`` and the cache fields
  as 0, and ``message_delta`` the final split (the SDKs keep the delta's).
- An empty answer has no content blocks (``content: []``), whole and
  streamed, as Anthropic's API answers it.
- A final assistant turn is a prefill, as at Anthropic: the chat body
  carries ``continue_final_message: true`` (vLLM's extension, which the
  neuron takes), and the answer is the continuation only.
- A neuron's refusal that names a field of the chat body (a schema no
  grammar can be built from) names the Anthropic request's field instead:
  ``tools.N.input_schema``, ``output_config.format.schema``.
- Claude Code's ``x-anthropic-billing-header: ...`` system block is client
  metadata, not prompt: dropped. Some versions put a per-request hash in
  it; reaching the model, it would change the prompt's first tokens on
  every turn and no prefix would ever be reused.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from cortex.errors import CortexError, InvalidRequest
from cortex.wire import fields
from cortex.wire.anthropic import CountTokensRequest, MessagesRequest, error_from
from cortex.wire.openai import unsupported_content

_DROPPED_BLOCKS = frozenset(
    {"thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result"}
)
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
#: How Claude Code's client-metadata system block starts.
BILLING_HEADER = "x-anthropic-billing-header:"


def _new_tool_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


# -- requests -----------------------------------------------------------------


def _kept(content: str | list[dict[str, Any]], where: str) -> list[tuple[str, dict[str, Any]]]:
    """The blocks of ``content`` that reach the model, each with its place."""
    if isinstance(content, str):
        return [(where, {"type": "text", "text": content})]
    return [
        (f"{where}.{j}", block)
        for j, block in enumerate(content)
        if block["type"] not in _DROPPED_BLOCKS
    ]


def _text(where: str, block: dict[str, Any], model: str) -> str:
    """The text of a block that must be text (a plain-text document counts).

    Raises:
      InvalidRequest: any other block, named by its type and place.
    """
    kind = block["type"]
    if kind == "text":
        return block["text"]
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text":
            return source.get("data", "")
        raise InvalidRequest(
            f"{where}.source: document source type {fields.shown(source.get('type'))} "
            "is not supported "
            f"by model {model!r}; only plain-text documents are",
            param=f"{where}.source",
        )
    raise unsupported_content(kind, model=model, where=where)


def _joined_text(content: str | list[dict[str, Any]], where: str, model: str) -> str:
    return "\n".join(_text(here, block, model) for here, block in _kept(content, where))


def _assistant(blocks: list[tuple[str, dict[str, Any]]], model: str) -> dict[str, Any]:
    texts = []
    calls = []
    for where, block in blocks:
        if block["type"] == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block.get("input", {})),
                    },
                }
            )
        else:
            texts.append(_text(where, block, model))
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
        if not texts:
            message["content"] = None
    return message


def _tool_message(where: str, block: dict[str, Any], model: str) -> dict[str, Any]:
    content = block.get("content")
    text = "" if content is None else _joined_text(content, f"{where}.content", model)
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _place_tool_message(out: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Insert a tool message right after the assistant turn that made the call.

    Usually that is the end of ``out``; a mid-conversation system message
    between the call and its result would otherwise split them, and chat
    templates expect results to follow their call.
    """
    call_id = message["tool_call_id"]
    for i in range(len(out) - 1, -1, -1):
        calls = out[i].get("tool_calls") or ()
        if out[i]["role"] == "assistant" and any(c["id"] == call_id for c in calls):
            j = i + 1
            while j < len(out) and out[j]["role"] == "tool":
                j += 1
            out.insert(j, message)
            return
    out.append(message)


def _append_user(
    out: list[dict[str, Any]], blocks: list[tuple[str, dict[str, Any]]], model: str
) -> None:
    texts: list[str] = []
    had_results = False
    for where, block in blocks:
        if block["type"] == "tool_result":
            had_results = True
            _place_tool_message(out, _tool_message(where, block, model))
        else:
            texts.append(_text(where, block, model))
    if texts or not had_results:
        out.append({"role": "user", "content": "\n".join(texts)})


def _is_billing_header(block: dict[str, Any]) -> bool:
    text = block.get("text")
    return block["type"] == "text" and isinstance(text, str) and text.startswith(BILLING_HEADER)


def _messages(req: MessagesRequest | CountTokensRequest, model: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system is not None:
        system = "\n".join(
            _text(where, block, model)
            for where, block in _kept(req.system, "system")
            if isinstance(req.system, str) or not _is_billing_header(block)
        )
        if system:
            out.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        where = f"messages.{i}.content"
        if message["role"] == "system":
            # Kept in place: Claude Code's mid-conversation reminders.
            out.append(
                {"role": "system", "content": _joined_text(message["content"], where, model)}
            )
        elif message["role"] == "assistant":
            out.append(_assistant(_kept(message["content"], where), model))
        else:
            _append_user(out, _kept(message["content"], where), model)
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for tool in tools:
        function: dict[str, Any] = {
            "name": tool["name"],
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def anthropic_to_openai(
    req: MessagesRequest | CountTokensRequest, *, model: str | None = None
) -> dict[str, Any]:
    """A chat completions body for an Anthropic request.

    Args:
      req: a messages request, or a count_tokens one (then only ``model``,
        ``messages`` and ``tools`` come out: what the prompt is made of).
      model: the concrete model id when the gateway resolved an alias.

    Raises:
      InvalidRequest: a block that is not text (an image, a PDF, a type this
        does not know), named by its type and place.
    """
    model = model or req.model
    body: dict[str, Any] = {"model": model, "messages": _messages(req, model)}
    if req.tools:
        body["tools"] = _tools(req.tools)
    if req.prefill:
        # vLLM's name for it: the answer continues the final assistant turn.
        body["continue_final_message"] = True
    if not isinstance(req, MessagesRequest):
        return body
    body["max_tokens"] = req.max_tokens
    if req.stop_sequences:
        body["stop"] = list(req.stop_sequences)
    # Absent sampling stays absent so the model's catalogue defaults apply.
    for key in ("temperature", "top_p", "top_k"):
        if getattr(req, key) is not None:
            body[key] = getattr(req, key)
    if req.tool_choice is not None:
        kind = req.tool_choice["type"]
        if kind == "tool":
            body["tool_choice"] = {
                "type": "function",
                "function": {"name": req.tool_choice["name"]},
            }
        else:
            body["tool_choice"] = _TOOL_CHOICE[kind]
        if req.tool_choice.get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False
    if req.output_schema is not None:
        # Constrained by the neuron's grammar, as OpenAI's json_schema is.
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": req.output_schema},
        }
    user_id = (req.metadata or {}).get("user_id")
    if isinstance(user_id, str):
        body["user"] = user_id
    body["stream"] = req.stream
    if req.stream:
        # message_delta must carry real totals, which come in the usage chunk.
        body["stream_options"] = {"include_usage": True}
    return body


def anthropic_fields(req: MessagesRequest) -> dict[str, str]:
    """The fields of the chat body ``anthropic_to_openai`` makes that the neuron may
    refuse, each mapped to the field of ``req`` it came from."""
    names = {
        f"tools[{i}].function.parameters": f"tools.{i}.input_schema"
        for i in range(len(req.tools or ()))
    }
    if req.output_schema is not None:
        names["response_format.json_schema"] = f"{req.output_field}.schema"
    return names


def in_request_terms(exc: CortexError, names: dict[str, str]) -> CortexError:
    """``exc``, a neuron's error about the chat body, naming the client's own field.

    ``names`` is ``anthropic_fields``: a ``param`` it maps is replaced, in
    the message too where the message begins with it (the Anthropic
    envelope carries the message alone).
    """
    if exc.param not in names:
        return exc
    field = names[exc.param]
    if exc.message.startswith(exc.param):
        exc.message = field + exc.message[len(exc.param) :]
    exc.param = field
    return exc


# -- answers ------------------------------------------------------------------


def stop_reason(finish_reason: str | None, stop_sequence: str | None, has_tool_use: bool) -> str:
    """Anthropic's stop_reason for an OpenAI finish_reason.

    ``tool_use`` only when a tool_use block really is in the answer: a
    client told tool_use with no block to run waits for nothing.
    """
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "content_filter":
        return "refusal"
    if has_tool_use:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def anthropic_usage(
    usage: dict[str, Any] | None, *, input_tokens: int = 0, output_tokens: int = 0
) -> dict[str, Any]:
    """Anthropic's ``usage`` for an OpenAI one (None: none came yet).

    Args:
      usage: the chat completion's or the stream's usage chunk's ``usage``.
      input_tokens, output_tokens: what stands in for a count it lacks.
    """
    usage = usage or {}
    prompt = usage.get("prompt_tokens", input_tokens)
    details = usage.get("prompt_tokens_details") or {}
    # Anthropic's input_tokens is the uncached part; see the module notes.
    cached = min(details.get("cached_tokens") or 0, prompt)
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.get("completion_tokens", output_tokens),
    }


def _tool_input(arguments: str | None) -> dict[str, Any]:
    """A tool call's ``input``: its arguments, cut ones read as far as they go."""
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        try:
            value = partial_json(arguments)
        except ValueError:
            value = None
    return value if isinstance(value, dict) else {}


class _Cut(Exception):
    """The text ended inside a string, number or literal."""


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"true": True, "false": False, "null": None}
_WHITESPACE = " \t\n\r"


def partial_json(text: str) -> Any:
    """``text``, the start of a JSON value, read as far as it is complete.

    As ``jiter.from_json(text, partial_mode=True)``, which the ``anthropic``
    SDK applies to a streamed tool input: open objects and arrays are
    closed, an unfinished member (a string, number or literal the text ends
    inside, or a key without its value) is dropped, a number the text ends
    on is kept. None when nothing complete was read.

    Raises:
      ValueError: ``text`` is not the start of a JSON value.
    """
    try:
        return _value(text, _skip(text, 0))[0]
    except _Cut:
        return None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _value(text: str, i: int) -> tuple[Any, int]:
    """The value at ``i`` and the index after it; a container may be partial."""
    if i >= len(text):
        raise _Cut
    char = text[i]
    if char == "{":
        return _container(text, i + 1, {}, "}")
    if char == "[":
        return _container(text, i + 1, [], "]")
    if char == '"':
        try:
            return json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        except ValueError:
            raise _Cut from None
    for literal, value in _LITERALS.items():
        if text.startswith(literal, i):
            return value, i + len(literal)
        if literal.startswith(text[i:]):
            raise _Cut
    match = _NUMBER.match(text, i)
    if match and (match.end() == len(text) or text[match.end()] not in _NUMBER_CHARS):
        return json.loads(match.group()), match.end()
    if all(c in _NUMBER_CHARS for c in text[i:]):
        raise _Cut  # "1.5e", "-": a number the text ends inside
    raise ValueError(f"not JSON at character {i}")


def _container(text: str, i: int, into: Any, close: str) -> tuple[Any, int]:
    """An object (``into`` a dict) or array from ``i``, closed early if the text ends."""
    first = True
    while True:
        i = _skip(text, i)
        if i >= len(text):
            return into, i
        if text[i] == close:
            return into, i + 1
        if not first:
            if text[i] != ",":
                raise ValueError(f"expected ',' at character {i}")
            i = _skip(text, i + 1)
        first = False
        try:
            if isinstance(into, dict):
                if i < len(text) and text[i] != '"':
                    raise ValueError(f"expected a key at character {i}")
                key, i = _value(text, i)
                i = _skip(text, i)
                if i < len(text) and text[i] != ":":
                    raise ValueError(f"expected ':' at character {i}")
                value, i = _value(text, _skip(text, i + 1))
                into[key] = value
            else:
                value, i = _value(text, i)
                into.append(value)
        except _Cut:
            return into, len(text)


def openai_to_anthropic(
    resp: dict[str, Any], *, model: str, message_id: str | None = None
) -> dict[str, Any]:
    """An Anthropic message for a ``chat.completion`` object."""
    choice = resp["choices"][0]
    message = choice.get("message") or {}
    calls = message.get("tool_calls") or []
    text = message.get("content") or ""
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "text", "text": text})
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _new_tool_id(),
                "name": function.get("name", ""),
                "input": _tool_input(function.get("arguments")),
            }
        )
    reason = stop_reason(choice.get("finish_reason"), choice.get("stop_sequence"), bool(calls))
    return {
        "id": message_id or f"msg_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": choice.get("stop_sequence") if reason == "stop_sequence" else None,
        "usage": anthropic_usage(resp.get("usage")),
    }


class AnthropicStream:
    """Turns a stream of chat completion chunks into Anthropic events.

    A pure state machine: the gateway feeds it each decoded chunk and
    encodes what comes back with ``sse.encode(payload, event=name)``.
    ``message_start`` comes before the first event that :meth:`feed`,
    :meth:`finish` or :meth:`error` returns (or from :meth:`start`), with
    the first chunk's ``prompt_usage`` when it has one. Blocks open just
    before their first delta and close before the next opens;
    ``message_delta`` waits for :meth:`finish`, by when the usage chunk has
    given the real totals.
    """

    def __init__(self, *, message_id: str, model: str, input_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self._next_index = 0
        #: (kind, index) of the open block: "text" or "tool_use".
        self._open: tuple[str, int] | None = None
        #: OpenAI tool-call index -> Anthropic block index.
        self._tools: dict[int, int] = {}
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None
        self._usage: dict[str, Any] | None = None
        self._prompt_usage: dict[str, Any] | None = None
        self._chunks_with_output = 0
        self._started = False

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        """``message_start``; nothing when it was sent already."""
        if self._started:
            return []
        self._started = True
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": anthropic_usage(self._prompt_usage, input_tokens=self.input_tokens),
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def ping(self) -> list[tuple[str, dict[str, Any]]]:
        """A ``ping``: what Anthropic's API sends between events."""
        return [("ping", {"type": "ping"})]

    def keep_alive(self) -> list[tuple[str, dict[str, Any]]]:
        """A keep-alive while the answer has not begun (a long prompt, a cold load).

        An empty text delta in the first block, opened for it: Claude Code's
        watchdog takes a ``ping`` for silence (it gives up after 300 s of
        anything else), and the answer's text goes on in that block. An
        answer that begins with a tool call closes it empty first.
        """
        events = self.start()
        if self._open is None and self._next_index == 0:
            events += self._start_block("text", {"type": "text", "text": ""})
        if self._open is not None and self._open[0] == "text":
            events.append(self._delta(self._open[1], {"type": "text_delta", "text": ""}))
        else:
            events += self.ping()
        return events

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        index = self._open[1]
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _start_block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        index = self._next_index
        self._next_index += 1
        self._open = (kind, index)
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return events

    def _delta(self, index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return (
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        )

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Translate one ``chat.completion.chunk`` (or a mid-stream error object)."""
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            return self.error(str(message or error))
        if isinstance(chunk.get("prompt_usage"), dict) and not self._started:
            self._prompt_usage = chunk["prompt_usage"]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        events = self.start()
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls"):
                self._chunks_with_output += 1
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._tool_call(call)
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
            if choice.get("stop_sequence") is not None:
                self._stop_sequence = choice["stop_sequence"]
        return events

    def _text(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = []
        if self._open is None or self._open[0] != "text":
            events += self._start_block("text", {"type": "text", "text": ""})
        index = self._next_index - 1
        events.append(self._delta(index, {"type": "text_delta", "text": text}))
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = []
        tool_index = call.get("index", 0)
        function = call.get("function") or {}
        if tool_index not in self._tools:
            block = {
                "type": "tool_use",
                "id": call.get("id") or _new_tool_id(),
                "name": function.get("name") or "",
                "input": {},
            }
            events += self._start_block("tool_use", block)
            self._tools[tool_index] = self._next_index - 1
        arguments = function.get("arguments")
        if arguments:
            # Sent even if a later call's block already opened (engines that
            # interleave calls): dropping argument text would be worse.
            events.append(
                self._delta(
                    self._tools[tool_index], {"type": "input_json_delta", "partial_json": arguments}
                )
            )
        return events

    @property
    def complete(self) -> bool:
        """Whether a finish_reason came: a stream that ends without one was cut short."""
        return self._finish_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The ``stop_reason`` that ``finish`` sends; None before a finish_reason came."""
        if not self.complete:
            return None
        return stop_reason(self._finish_reason, self._stop_sequence, bool(self._tools))

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """The events that end the stream once the chat stream has ended.

        Complete: close the open block; ``message_delta`` with the totals;
        ``message_stop``. Without a usage chunk, output_tokens falls back to
        the number of chunks that carried output (one token each from a
        cortex neuron). Not complete: the ``error`` event (status 502), as
        for a stream that failed mid-way; never a clean ``end_turn``.
        """
        if not self.complete:
            return self.error(
                "the neuron's stream ended before its answer did (no finish_reason)", status=502
            )
        events = self.start() + self._close()
        delta_usage = anthropic_usage(
            self._usage, input_tokens=self.input_tokens, output_tokens=self._chunks_with_output
        )
        reason = self.stop_reason
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": reason,
                        "stop_sequence": self._stop_sequence if reason == "stop_sequence" else None,
                    },
                    "usage": delta_usage,
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def error(self, message: str, *, status: int = 500) -> list[tuple[str, dict[str, Any]]]:
        """The ``error`` event that ends a stream which failed mid-way."""
        return [*self.start(), ("error", error_from(status, message))]
