"""Tool calls in generated text: the markup families and the streaming parser.

Models write tool calls as text in their family's markup:

- ``hermes`` (Qwen 2.5/3, Hermes, most ChatML models):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block a call;
- ``llama3`` (Llama 3.1-3.3): the message is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several calls separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

:class:`ToolCallParser` turns generated text into content and OpenAI tool-call
deltas as it streams, holding back only what may still become markup.

A public module: engines import it to name their ``tool_format``
(:func:`detect_family`, :func:`check_family`), to hand out :data:`MARKUP` as
text, and to enforce a ``cortex.harness.ToolCalls`` constraint in the
family's markup (the constants below). The neuron parses every answer with
it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import attrs

from cortex.neuron.stops import partial_suffix

FAMILIES = ("hermes", "llama3", "mistral")
#: The family of a model nothing tells us about: ChatML models are the most
#: common local ones, and their tool-tuned versions speak Hermes.
DEFAULT_FAMILY = "hermes"

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
#: Markup that may be a single special token; engines must hand out its text.
MARKUP = (HERMES_OPEN, HERMES_CLOSE, PYTHON_TAG, MISTRAL_OPEN)

_OPENERS = {"hermes": (HERMES_OPEN,), "llama3": (PYTHON_TAG,), "mistral": (MISTRAL_OPEN,)}
_ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
_KNOWN_KEYS = _ARGUMENT_KEYS | {"name", "id", "type"}
_WS = " \t\r\n"
# Characters that may appear outside strings in JSON.
_JSON_CHARS = frozenset(_WS + "{}[],:-+.0123456789eE" + "truefalsn")


# -- families ---------------------------------------------------------------------------


def detect_family(template: str | None, *, name: str | None = None) -> str | None:
    """The tool-call family a chat template (or, lacking one, a model name) implies.

    Args:
      template: the model's Jinja chat template text.
      name: the model's name or architecture from its metadata.

    Returns None when nothing points to a family.
    """
    if template:
        if HERMES_OPEN in template:
            return "hermes"
        if MISTRAL_OPEN in template:
            return "mistral"
        if PYTHON_TAG in template or ("<|start_header_id|>" in template and "tools" in template):
            return "llama3"
    lowered = (name or "").lower()
    for needle, family in (
        ("qwen", "hermes"),
        ("hermes", "hermes"),
        ("mistral", "mistral"),
        ("mixtral", "mistral"),
        ("llama-3", "llama3"),
        ("llama 3", "llama3"),
        ("llama3", "llama3"),
    ):
        if needle in lowered:
            return family
    return None


def check_family(value: str) -> str:
    """``value`` if it names a family. Raises ValueError otherwise."""
    if value not in FAMILIES:
        raise ValueError(f"expected one of {', '.join(FAMILIES)}, got {value!r}")
    return value


def family_of(model: Any) -> str:
    """The family the neuron parses a loaded model's output with."""
    family = getattr(model, "tool_format", None)
    return family if family in FAMILIES else DEFAULT_FAMILY


# -- parsed output ----------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@attrs.frozen
class ToolCallDelta:
    """A piece of the ``index``-th tool call: its header first, then argument text.

    The first delta of a call carries ``id`` and ``name`` (and empty
    ``arguments``); later ones carry only ``arguments`` fragments.
    """

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The chat-completions ``delta.tool_calls[]`` entry."""
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@attrs.define
class ToolCall:
    """A whole call, as the parser has seen it so far."""

    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The chat-completions ``message.tool_calls[]`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Piece = str | ToolCallDelta

# Results of _CallObject.feed.
_MORE, _DONE, _FAIL, _CUT = range(4)


class _CallObject:
    """Scans one ``{"name": ..., "arguments": ...}`` object a character at a time.

    Before it commits, any departure from the shape fails (the parser then
    hands the text back as content). It commits once the name is known and
    the arguments have started: from then on the call is reported and the
    arguments stream through as they come. A committed object ends at its
    closing brace, or early at a character JSON cannot contain there.
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._state = "open"
        self._key: str | None = None
        self._text: list[str] = []
        self._kind = ""
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._streaming = False
        self.name: str | None = None
        self.arguments: str | None = None
        self.committed = False

    def _bad(self) -> int:
        return _CUT if self.committed else _FAIL

    def _commit(self) -> None:
        assert self.name is not None
        self.committed = True
        self._parser._open_call(self.name)

    def feed(self, ch: str) -> int:
        state = self._state
        if state == "value":
            return self._value_char(ch)
        if ch in _WS and state != "key":
            return _MORE
        if state == "open":
            if ch != "{":
                return _FAIL
            self._state = "key_or_close"
        elif state in ("key_or_close", "next_key"):
            if ch == '"':
                self._state, self._text, self._escape = "key", [], False
            elif ch == "}" and state == "key_or_close":
                return self._close()
            else:
                return self._bad()
        elif state == "key":
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                try:
                    self._key = json.loads('"' + "".join(self._text) + '"')
                except ValueError:
                    return self._bad()
                if not self.committed and self._key not in _KNOWN_KEYS:
                    return _FAIL
                self._state = "colon"
                return _MORE
            elif ch < " ":
                return self._bad()
            self._text.append(ch)
        elif state == "colon":
            if ch != ":":
                return self._bad()
            self._state = "value_start"
        elif state == "value_start":
            return self._value_start(ch)
        elif state == "after_value":
            if ch == ",":
                self._state = "next_key"
            elif ch == "}":
                return self._close()
            else:
                return self._bad()
        return _MORE

    def _value_start(self, ch: str) -> int:
        if ch == '"':
            self._kind, self._in_string, self._escape = "string", True, False
        elif ch in "{[":
            self._kind, self._depth, self._in_string = "container", 1, False
        elif ch in "-0123456789tfn":
            self._kind = "scalar"
        else:
            return self._bad()
        self._text = [ch]
        self._state = "value"
        if (
            self._key in _ARGUMENT_KEYS
            and self.arguments is None
            and self.name is not None
            and not self.committed
            and self._kind != "string"
        ):
            self._commit()
            self._streaming = True
        if self._streaming:
            self._parser._call_arguments(ch)
        return _MORE

    def _value_char(self, ch: str) -> int:
        if self._kind == "scalar":
            if ch in _WS or ch in ",}":
                if not self._value_done():
                    return _FAIL
                self._state = "after_value"
                return self.feed(ch)
            if ch not in _JSON_CHARS:
                return self._bad()
        elif self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        elif ch not in _JSON_CHARS:
            return self._bad()
        self._text.append(ch)
        if self._streaming:
            self._parser._call_arguments(ch)
        ended = (self._kind == "string" and not self._in_string) or (
            self._kind == "container" and self._depth == 0
        )
        if ended:
            if not self._value_done():
                return _FAIL
            self._state = "after_value"
        return _MORE

    def _value_done(self) -> bool:
        """A top-level value ended; False when that breaks the call's shape."""
        text = "".join(self._text)
        if self._streaming:
            self._streaming = False
            self.arguments = text
            return True
        if self._key == "name":
            if self.name is not None or self.committed:
                return True
            try:
                name = json.loads(text, strict=False) if self._kind == "string" else None
            except ValueError:
                name = None
            if not isinstance(name, str) or not name:
                return False
            self.name = name
            if self.arguments is not None:
                self._commit()
                self._parser._call_arguments(self.arguments)
        elif self._key in _ARGUMENT_KEYS and self.arguments is None:
            if self._kind == "string":
                # Arguments as a JSON-encoded string: OpenAI's own shape.
                try:
                    text = json.loads(text, strict=False)
                except ValueError:
                    return False
            self.arguments = text
            if self.name is not None and not self.committed:
                self._commit()
                self._parser._call_arguments(text)
        return True

    def _close(self) -> int:
        if not self.committed:
            if self.name is None:
                return _FAIL
            self._commit()
            self._parser._call_arguments("{}" if self.arguments is None else self.arguments)
        self._state = "done"
        return _DONE


class ToolCallParser:
    """Splits generated text into content and tool calls, as it streams.

    Feed it the text deltas in order; each call returns the pieces now safe to
    send: content strings and :class:`ToolCallDelta` values. Text that may
    still turn out to be markup is held back until it is decided; text that
    turns out not to be a call is released as content, so nothing is lost.
    Whitespace right before or after a call is part of its markup and dropped.

    A call is committed once its name and the start of its arguments have
    been seen; from then on its arguments stream through verbatim, even if
    the model later breaks the JSON (as OpenAI's own models may).

    Args:
      family: one of :data:`FAMILIES`.
      new_id: makes tool-call ids (tests pin them).
    """

    def __init__(self, family: str, *, new_id: Callable[[], str] = new_call_id) -> None:
        self.family = check_family(family)
        self.calls: list[ToolCall] = []
        self._new_id = new_id
        self._openers = _OPENERS[family]
        self._out: list[Piece] = []
        self._pending = ""  # text mode: undecided text (a partial opener)
        self._space = ""  # text mode: trailing whitespace held back
        self._after_call = False
        self._bare_json = family == "llama3"  # a `{` may open a call here
        self._mode = "text"
        self._raw: list[str] = []  # markup consumed and not yet reported
        self._literal = ""  # a literal being matched, and how far
        self._matched = 0
        self._object: _CallObject | None = None
        #: The region being read began with the family's opener.
        self._opened = False

    # -- the public side --

    def feed(self, text: str) -> list[Piece]:
        """Add generated text; return the content and tool-call deltas now decided."""
        self._run(text)
        return self._take()

    def flush(self) -> list[Piece]:
        """End of output: decide everything still held back.

        Output cut short (the token limit) may end inside markup. A call
        whose arguments have begun ends with what it has. Markup before
        that point is dropped, never handed out as content: an opener (or
        more than its first character), whitespace after it, an object that
        may still be a call (after an opener, or bare with its name read).
        """
        if self._mode == "text":
            pending, self._pending = self._pending, ""
            if len(pending) < 2:
                self._release(pending)
            else:
                self._space = ""  # an opener cut short, with the space before it
        elif self._object is not None and self._object.committed:
            pass  # a call cut short: it ends with what it has
        elif self._after_call and HERMES_CLOSE.startswith("".join(self._raw).strip(_WS)):
            pass  # whitespace or a closing tag cut short, after a call
        elif self._mode != "literal" and (self._opened or self._named()):
            pass  # a call cut short before its arguments: markup, dropped
        else:
            self._fail()
        if not self._after_call and self._space:
            self._out.append(self._space)
        self._space = ""
        self._raw = []
        self._mode = "text"
        self._object = None
        self._opened = False
        return self._take()

    # -- callbacks from _CallObject --

    def _open_call(self, name: str) -> None:
        call = ToolCall(id=self._new_id(), name=name)
        self.calls.append(call)
        self._raw = []
        self._space = ""
        self._out.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, name=name))

    def _call_arguments(self, text: str) -> None:
        if not text:
            return
        index = len(self.calls) - 1
        self.calls[index].arguments += text
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == index and last.name is None:
            self._out[-1] = ToolCallDelta(index=index, arguments=last.arguments + text)
        else:
            self._out.append(ToolCallDelta(index=index, arguments=text))

    # -- the machinery --

    def _take(self) -> list[Piece]:
        out, self._out = self._out, []
        return out

    def _release(self, text: str) -> None:
        """Content: held whitespace plus ``text``, less whitespace that may precede a call."""
        text = self._space + text
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                self._space = ""
                return
            self._after_call = False
        body = text.rstrip(_WS)
        self._space = text[len(body) :]
        if body:
            self._out.append(body)
            self._bare_json = False

    def _named(self) -> bool:
        """Whether the object being read has its name: a call, opener or not."""
        return self._object is not None and self._object.name is not None

    def _fail(self) -> None:
        """Not a call after all: the markup read so far is content."""
        raw = "".join(self._raw)
        self._raw = []
        self._object = None
        self._mode = "text"
        self._opened = False
        self._bare_json = False
        self._release(raw)

    def _run(self, text: str) -> None:
        i = 0
        while True:
            if self._mode == "text":
                text = self._pending + text[i:]
                self._pending = ""
                i = self._scan_text(text)
                if i >= len(text):
                    return
            if i >= len(text):
                return
            ch = text[i]
            if self._region_char(ch):
                i += 1

    def _scan_text(self, text: str) -> int:
        """Release the content of ``text``; the index where markup starts, else its length."""
        if self._bare_json:
            body = text.lstrip(_WS)
            if not body:
                self._space += text
                return len(text)
            if body[0] == "{":
                start = len(text) - len(body)
                raw, self._space = self._space + text[:start], ""
                self._begin("object", raw=raw)
                return start
            self._bare_json = False
        first: tuple[int, str] | None = None
        for opener in self._openers:
            at = text.find(opener)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, opener)
        if first is not None:
            at, opener = first
            self._release(text[:at])
            raw, self._space = self._space + opener, ""
            self._begin("after_opener", raw=raw)
            self._opened = True
            return at + len(opener)
        keep = partial_suffix(text, self._openers)
        self._release(text[: len(text) - keep])
        self._pending = text[len(text) - keep :]
        return len(text)

    def _begin(self, mode: str, *, raw: str) -> None:
        self._mode = mode
        self._raw = [raw] if raw else []
        if mode == "object":
            self._object = _CallObject(self)

    def _region_char(self, ch: str) -> bool:
        """Consume one character of markup; False when it must be read again as text."""
        mode = self._mode
        if mode == "object":
            assert self._object is not None
            result = self._object.feed(ch)
            if result == _MORE:
                if not self._object.committed:
                    self._raw.append(ch)
                return True
            if result == _FAIL:
                self._fail()
                return False
            self._object = None
            self._after_call = True
            self._raw = []
            self._mode = "after_call"
            return result == _DONE
        if mode in ("after_opener", "mistral_item"):
            # Whitespace, then the call's object; Mistral's opener may first
            # open a list of them.
            if ch in _WS:
                self._raw.append(ch)
                return True
            if mode == "after_opener" and self.family == "mistral" and ch == "[":
                self._raw.append(ch)
                self._mode = "mistral_item"
                return True
            if ch == "{":
                self._begin("object", raw="".join(self._raw))
                return False
            self._fail()
            return False
        if mode == "literal":
            if ch == self._literal[self._matched]:
                self._raw.append(ch)
                self._matched += 1
                if self._matched == len(self._literal):
                    self._raw = []
                    self._mode = "text"
                return True
            # Not the closing markup: read what was taken for it again, as text.
            self._pending = "".join(self._raw)
            self._raw = []
            self._mode = "text"
            return False
        # After a call: whitespace, then the family's separator or closing markup.
        if ch in _WS:
            self._raw.append(ch)
            return True
        self._raw = []
        self._mode = "text"
        if self.family == "hermes" and ch == "<":
            self._raw.append(ch)
            self._mode, self._literal, self._matched = "literal", HERMES_CLOSE, 1
            return True
        if self.family == "mistral" and ch == ",":
            self._mode = "mistral_item"
            return True
        if self.family == "mistral" and ch == "]":
            return True
        if self.family == "llama3":
            self._bare_json = True
            return ch == ";"
        return False


def parse_tool_calls(
    text: str, family: str, *, new_id: Callable[[], str] = new_call_id
) -> tuple[str, list[ToolCall]]:
    """The content and tool calls of a whole generated text."""
    parser = ToolCallParser(family, new_id=new_id)
    pieces = parser.feed(text) + parser.flush()
    return "".join(p for p in pieces if isinstance(p, str)), parser.calls
