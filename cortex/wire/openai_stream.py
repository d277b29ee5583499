"""Builders for OpenAI event streams: chat completions and text completions.

Beside ``responses.ResponsesStream`` and the Anthropic stream: each method
returns ``(event name, payload)`` frames to encode with
``sse.encode(payload, event=name)``. OpenAI streams name no events, so the
name is always None, and the stream ends with the raw ``[DONE]`` frame.
Pure data in, data out: the neuron feeds them what its generations produce.
"""

from __future__ import annotations

from typing import Any

from cortex.errors import GenerationFailed
from cortex.wire import openai

Frame = tuple[str | None, dict[str, Any] | str]
DONE: Frame = (None, "[DONE]")


class ChatStream:
    """Builds a ``chat.completion.chunk`` stream: text and tool-call deltas.

    The role rides with the first piece: a role-only chunk sent before any
    token would fake the time to first token. A stream whose first piece is
    a tool call says ``content: null`` beside the role, as OpenAI's do.

    With ``include_usage`` and ``prompt`` known, the first chunk also
    carries ``prompt_usage`` (a cortex extension): the prompt's tokens and
    the part read from the prompt cache, known once the prompt is seated,
    long before the closing usage chunk. The gateway's Anthropic stream
    needs them for ``message_start``.

    Args:
      include_usage: the client asked for ``stream_options.include_usage``.
      prompt: the prompt's counts (``completion_tokens`` unused); None: unknown.
    """

    def __init__(
        self,
        *,
        id: str,
        created: int,
        model: str,
        include_usage: bool,
        prompt: openai.Usage | None = None,
    ) -> None:
        self._ids = dict(id=id, created=created, model=model)
        self._include_usage = include_usage
        self._prompt = prompt if include_usage else None
        self._first = True

    def _chunk(self, delta: dict[str, Any], **fields: Any) -> Frame:
        chunk = openai.chat_chunk(
            **self._ids, delta=delta, include_usage=self._include_usage, **fields
        )
        if self._prompt is not None:
            chunk["prompt_usage"] = openai.prompt_usage(self._prompt)
            self._prompt = None
        return None, chunk

    def text(self, text: str) -> list[Frame]:
        delta: dict[str, Any] = {"content": text}
        if self._first:
            delta = {"role": "assistant", **delta}
            self._first = False
        return [self._chunk(delta)]

    def tool_call(self, entry: dict[str, Any]) -> list[Frame]:
        """A ``delta.tool_calls[]`` entry (``ToolCallDelta.to_openai()``)."""
        delta: dict[str, Any] = {"tool_calls": [entry]}
        if self._first:
            delta = {"role": "assistant", "content": None, **delta}
            self._first = False
        return [self._chunk(delta)]

    def finish(
        self, *, finish_reason: str, stop_sequence: str | None, usage: openai.Usage
    ) -> list[Frame]:
        delta = {"role": "assistant", "content": ""} if self._first else {}
        frames = [self._chunk(delta, finish_reason=finish_reason, stop_sequence=stop_sequence)]
        if self._include_usage:
            frames.append((None, openai.usage_chunk(**self._ids, usage=usage)))
        return [*frames, DONE]

    def fail(self, message: str) -> list[Frame]:
        return [(None, openai.error_body(GenerationFailed(message)))]


class CompletionStream:
    """Builds a ``text_completion`` stream over one or more prompts.

    Choices follow each other, one prompt at a time, each numbered by its
    prompt's index; usage adds up over them.
    """

    def __init__(self, *, id: str, created: int, model: str, include_usage: bool) -> None:
        self._ids = dict(id=id, created=created, model=model)
        self._include_usage = include_usage
        self._usage = openai.Usage(prompt_tokens=0, completion_tokens=0)

    def text(self, index: int, text: str) -> list[Frame]:
        return [
            (
                None,
                openai.completion_chunk(
                    **self._ids, text=text, index=index, include_usage=self._include_usage
                ),
            )
        ]

    def finish_choice(
        self, index: int, *, finish_reason: str, stop_sequence: str | None, usage: openai.Usage
    ) -> list[Frame]:
        self._usage = openai.Usage(
            prompt_tokens=self._usage.prompt_tokens + usage.prompt_tokens,
            completion_tokens=self._usage.completion_tokens + usage.completion_tokens,
            cached_tokens=self._usage.cached_tokens + usage.cached_tokens,
        )
        chunk = openai.completion_chunk(
            **self._ids,
            text="",
            index=index,
            finish_reason=finish_reason,
            stop_sequence=stop_sequence,
            include_usage=self._include_usage,
        )
        return [(None, chunk)]

    def finish(self) -> list[Frame]:
        if not self._include_usage:
            return [DONE]
        chunk = openai.usage_chunk(**self._ids, usage=self._usage)
        chunk["object"] = "text_completion"
        return [(None, chunk), DONE]

    def error(self, body: dict[str, Any]) -> list[Frame]:
        return [(None, body)]
