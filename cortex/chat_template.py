"""What a model's chat template can take, and generic forms for what it cannot.

A template may have no place for part of a request. Gemma's has no system
role: llama-cpp-python's ``gemma`` chat format drops system messages
without a word, and Jinja templates of that kind call
``raise_exception('System role not supported')``. Many templates ignore
``tools`` altogether, and with them earlier tool calls and results. Losing
either silently answers a question the client did not ask, so an engine
probes its template once at load (:func:`probe_template`) and rewrites each
conversation into what the template does take (:func:`adapt_chat`):

- system messages are folded into the next user turn, as Gemma's own
  template does with a leading one: the system text, a blank line, then
  the user text; one right after a user turn joins that turn, so that the
  conversation's prompt only grows at its end (:func:`fold_system`);
- tools become the Hermes-style block :func:`tools_text` writes, added to
  the leading system text; earlier tool calls become ``<tool_call>`` text in
  their assistant turn and tool results ``<tool_response>`` text in a user
  turn (:func:`tool_turns_as_text`). The neuron then reads the model's
  answer with the ``hermes`` parser, so an engine that adapts tools reports
  ``tool_format = "hermes"``.

Pure functions on OpenAI-shaped messages, for engines to call from
``LoadedModel.render_chat``; the neuron has already made every content a
string (None on an assistant turn that only calls tools).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from cortex.errors import InvalidRequest
from cortex.toolcalls import HERMES_CLOSE, HERMES_OPEN

#: Renders (messages, tools) to the template's prompt text; may raise.
Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]

SYSTEM_PROBE = "cortex-probe-system-5e1d"
TOOL_PROBE = "cortex_probe_tool_5e1d"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_PROBE,
        "description": "A probe.",
        "parameters": {"type": "object", "properties": {}},
    },
}

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    f"{HERMES_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    f"{HERMES_CLOSE}"
)


@attrs.frozen
class TemplateSupport:
    """Which parts of a conversation a chat template renders.

    Attributes:
      system: system messages reach the prompt.
      tools: ``tools`` reach the prompt (and, it is assumed, the template
        also renders tool calls and tool results).
    """

    system: bool = True
    tools: bool = True


def probe_template(render: Render) -> TemplateSupport:
    """Render two probe conversations once and see what reaches the prompt.

    One has a system message, the other a tool; a part counts as taken when
    its sentinel text appears in the prompt. A template that raises on a
    probe does not take that part either.
    """
    system = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "x"}]
    user = [{"role": "user", "content": "x"}]
    return TemplateSupport(
        system=_reaches(render, system, None, SYSTEM_PROBE),
        tools=_reaches(render, user, [_PROBE_TOOL], TOOL_PROBE),
    )


def _reaches(
    render: Render,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    sentinel: str,
) -> bool:
    try:
        return sentinel in render(messages, tools)
    except Exception:  # raise_exception() in the template, or a template bug
        return False


def adapt_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    support: TemplateSupport,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``messages`` and ``tools`` rewritten into what the template takes.

    Returns the messages and the tools to hand the template (None when the
    tools went into the text).
    """
    if not support.tools:
        messages = tool_turns_as_text(messages)
        if tools:
            messages = _with_system_text(messages, tools_text(tools))
        tools = None
    if not support.system:
        messages = fold_system(messages)
    return messages, tools


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The Hermes-style description of ``tools`` (OpenAI tool objects), one JSON a line."""
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # from a caller other than the neuron
        kinds = {part.get("type") for part in content} - {"text"}
        if kinds:
            raise InvalidRequest(f"content block type {kinds.pop()!r} cannot be folded into text")
        return "\n".join(part["text"] for part in content)
    return content if isinstance(content, str) else ""


def _joined(*texts: str) -> str:
    return "\n\n".join(t for t in texts if t)


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` after the leading system message's own, or as a new leading one."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": _joined(_text(messages[0]), text)}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold system messages into a user turn: system text, a blank line, user text.

    One right after a user turn joins that turn, after its text (Claude Code
    puts a reminder there, and the turn renders the same when the
    conversation goes on: the prompt cache keeps it); any other goes into
    the next user turn, before its text, or becomes a user turn of its own
    at the end when none follows.
    """
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            if out and out[-1]["role"] == "user" and not pending:
                out[-1] = {**out[-1], "content": _joined(_text(out[-1]), _text(message))}
            else:
                pending.append(_text(message))
            continue
        if message["role"] == "user" and pending:
            message = {**message, "content": _joined(*pending, _text(message))}
            pending = []
        out.append(message)
    if any(pending):
        if out and out[-1]["role"] == "user":
            out[-1] = {**out[-1], "content": _joined(_text(out[-1]), *pending)}
        else:
            out.append({"role": "user", "content": _joined(*pending)})
    return out


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            pass  # not JSON: shown as the string the model wrote
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


def tool_turns_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier tool calls and results as Hermes text, for a template that ignores them.

    An assistant turn's calls follow its text as ``<tool_call>`` blocks; a
    run of tool results becomes one user turn of ``<tool_response>`` blocks,
    as Qwen's template writes them.
    """
    out: list[dict[str, Any]] = []
    results: list[str] = []

    def flush() -> None:
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results.clear()

    for message in messages:
        if message["role"] == "tool":
            results.append(f"<tool_response>\n{_text(message)}\n</tool_response>")
            continue
        flush()
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            text = "\n".join(t for t in (_text(message), *map(_call_text, calls)) if t)
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = text
        out.append(message)
    flush()
    return out
