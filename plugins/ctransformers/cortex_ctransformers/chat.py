"""Named chat formats; GGML files carry no chat template. Pure, no ctransformers.

ctransformers tokenizes control tokens written as text like any other text,
so ChatML's ``<|im_start|>`` becomes a few ordinary tokens; models trained on
ChatML with those as single tokens will see a slightly different prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from cortex.errors import InvalidRequest
from cortex.harness import ChatPrompt


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"content parts of type {kind!r} are not supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise InvalidRequest("message content must be a string or a list of parts")


def chatml(messages: list[dict[str, Any]]) -> ChatPrompt:
    text = "".join(f"<|im_start|>{m['role']}\n{_text(m)}<|im_end|>\n" for m in messages)
    return ChatPrompt(
        text=text + "<|im_start|>assistant\n",
        stop=("<|im_end|>", "<|im_start|>"),
        special=False,
    )


def llama2(messages: list[dict[str, Any]]) -> ChatPrompt:
    """Meta's Llama 2 chat format; the system prompt joins the first user turn."""
    system = "".join(_text(m) for m in messages if m["role"] == "system")
    text = ""
    for m in messages:
        if m["role"] == "user":
            content = _text(m)
            if system:
                content, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}", ""
            text += f"[INST] {content} [/INST]"
        elif m["role"] == "assistant":
            text += f" {_text(m)} "
    return ChatPrompt(text=text, stop=("[INST]",), special=False)


def plain(messages: list[dict[str, Any]]) -> ChatPrompt:
    """``role: content`` lines, for base models; the next ``user:`` line ends the reply."""
    text = "".join(f"{m['role']}: {_text(m)}\n" for m in messages)
    return ChatPrompt(text=text + "assistant:", stop=("\nuser:",), special=False)


FORMATS: dict[str, Callable[[list[dict[str, Any]]], ChatPrompt]] = {
    "chatml": chatml,
    "llama-2": llama2,
    "plain": plain,
}
#: What a format writes between its generation prompt and an assistant
#: turn's text: the model's answers begin with it, so a prefill does too.
_TEXT_LEAD = {"chatml": "", "llama-2": " ", "plain": " "}


def render(
    name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> ChatPrompt:
    """Render ``messages`` with the format ``name`` (a key of FORMATS).

    Raises:
      InvalidRequest: tools were given (no format here describes them), or a
        message has no role or an unsupported content part.
    """
    if tools:
        raise InvalidRequest(
            f"chat format {name!r} of the ctransformers engine does not support tools",
            param="tools",
        )
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("every message needs a role", param="messages")
    return FORMATS[name](messages)


def render_prefilled(
    name: str, messages: list[dict[str, Any]], prefill: str, tools: list[dict[str, Any]] | None
) -> ChatPrompt:
    """``messages`` in the format ``name``, then an assistant turn begun with ``prefill``.

    The turn's text is written as the format writes an assistant's (llama-2
    and plain put a space before it), with no end of turn: the answer
    continues it.

    Raises:
      InvalidRequest: as :func:`render`.
    """
    prompt = render(name, messages, tools)
    lead = _TEXT_LEAD[name] if prefill else ""
    return attrs.evolve(prompt, text=prompt.text + lead + prefill)
