"""The inference routes' dialects: what the exchange pipeline asks of each.

One :class:`Dialect` object per inference route parameterises the one
exchange pipeline (``cortex.gateway.exchange``):

- ``parse``: the request body, validated (400 in the dialect's envelope);
- ``to_upstream``: what to send a neuron, once the model is resolved;
- ``send``: send it (``Proxy.dispatch``, and for an Anthropic stream the
  prompt's count beside it);
- ``answer``: a whole answer from the neuron's whole body;
- ``relay``: a stream, from the neuron's chunks;
- ``error``: an error as the dialect's answer.

:class:`OpenAI` passes chat completions, completions and responses through
as they came (the body is re-encoded only when the gateway changes it) and
their streams byte for byte, watching only for the usage and whether the
answer called a tool (in the stream's last chunks). :class:`Messages`
translates Anthropic messages to chat completions and the answers back
(``cortex.wire.translate``); :class:`CountTokens` asks the model's
tokenizer. Answers and relays set ``Exchange.status``, ``usage`` and
``follows`` (the answer called a tool: ``scheduler.follow_ups``); the
pipeline records them.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import attrs
import trio

from cortex.errors import CortexError, InvalidRequest, UpstreamError, log_summary
from cortex.gateway import affinity
from cortex.gateway.context import Gateway
from cortex.gateway.proxy import Exchange
from cortex.wire import anthropic, envelope, openai, responses, sse, translate

log = logging.getLogger(__name__)

#: Seconds a stream waits past its first byte for the prompt's token count.
COUNT_GRACE = 1.0
#: Chunks kept to find the final usage in; the usage chunk is the last
#: before ``[DONE]`` (chat, completions) or the last event (responses).
TAIL_CHUNKS = 8

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


@attrs.frozen
class Request:
    """A parsed request body: the model it names, whether it streams, the dialect's parse."""

    model: str
    stream: bool
    data: Any


@attrs.frozen
class Upstream:
    """What an exchange sends a neuron."""

    path: str
    content: bytes
    #: The body to count the prompt of (``/tokenize``) beside the request; None: no count.
    count: dict[str, Any] | None = None
    #: The fields of ``content`` a neuron's refusal may name -> the client's own names
    #: for them, where the two differ (``translate.anthropic_fields``).
    fields: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Answer:
    """A whole (non-streamed) answer."""

    status: int
    content_type: bytes
    body: bytes


class Dialect:
    """How one inference route reads its requests and writes its answers and errors.

    Attributes:
      endpoint: the route's label in the metrics and the log.
      errors: the envelope dialect (``envelope.OPENAI``, ``envelope.ANTHROPIC``).
    """

    endpoint: str
    errors: str = envelope.OPENAI

    def parse(self, body: dict[str, Any], content: bytes) -> Request:
        """Validate the decoded ``body`` (``content`` as it came).

        Raises:
          InvalidRequest: not a request of this route.
        """
        raise NotImplementedError

    def to_upstream(self, gateway: Gateway, ex: Exchange, request: Request) -> Upstream:
        """What to send a neuron for ``request``, its model resolved to ``ex.model``."""
        raise NotImplementedError

    async def send(self, gateway: Gateway, ex: Exchange, upstream: Upstream) -> None:
        """Send ``upstream`` until a neuron answers its first byte (``Proxy.dispatch``).

        Raises:
          CortexError: for the client (no route, the neuron's own error).
        """
        await gateway.proxy.dispatch(ex, upstream.path, upstream.content)

    def answer(self, ex: Exchange) -> Answer:
        """The answer to a request that does not stream, from the neuron's whole body.

        Raises:
          UpstreamError: the neuron's body is not what it should be.
        """
        raise NotImplementedError

    def stream_type(self, ex: Exchange) -> bytes:
        """The content type of a stream's answer."""
        return EVENT_STREAM

    def early_start(self, ex: Exchange, upstream: Upstream) -> bytes | None:
        """A stream's opening events, sent before the neuron's first byte; None: wait for it.

        For clients that give up on a silent stream (Claude Code, after
        300 s; a proxy's or a client's read timeout) while a long prompt is
        processed. May set ``ex.early``, the dialect's state for the rest.
        """
        return None

    def keep_alive(self, ex: Exchange) -> bytes:
        """What keeps a stream started early alive until the first byte."""
        raise NotImplementedError

    def stream_error(self, ex: Exchange, exc: CortexError) -> bytes:
        """The event that ends a stream under way whose request then failed.

        Started early and failed before the neuron's first byte, or failed
        after it (the neuron, a timeout, the shutdown): the stream's answer
        so far is the dialect's state in ``ex.early``.
        """
        raise NotImplementedError

    def relay(self, gateway: Gateway, ex: Exchange) -> AsyncGenerator[bytes, None]:
        """A stream's answer, from ``ex.first`` and the neuron's next chunks.

        Ends with the dialect's ``stream_error`` event if the neuron fails mid-way.
        """
        raise NotImplementedError

    def error(self, exc: CortexError, request_id: str) -> tuple[int, bytes, list[tuple[str, str]]]:
        """(status, body, headers besides content-type) answering ``exc``."""
        return envelope.error_parts(exc, dialect=self.errors, request_id=request_id)

    def id_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in envelope.id_headers(request_id, self.errors)
        ]


# -- OpenAI: passed through ----------------------------------------------------------


def usage_from_tail(tail: Iterable[bytes]) -> dict[str, Any] | None:
    """The last non-null ``usage`` object in the stream's last chunks, if any."""
    data = b"".join(tail)
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    start = data.rfind(b"data:", 0, at)
    end = data.find(b"\n", at)
    if start < 0:
        return None
    try:
        frame = json.loads(data[start + 5 : end if end >= 0 else None])
    except ValueError:
        return None
    return _usage_of(frame)


def usage_from_body(body: bytes) -> dict[str, Any] | None:
    try:
        return _usage_of(json.loads(body))
    except ValueError:
        return None


def calls_tool(payload: Any) -> bool:
    """Whether a chat answer or chunk, or a Responses answer or final event, calls a tool.

    Chat: a choice with ``finish_reason: "tool_calls"``; Responses: a
    ``function_call`` item in the response's ``output`` (the whole body, or
    the ``response`` of its last event).
    """
    if not isinstance(payload, dict):
        return False
    choices = payload.get("choices")
    if isinstance(choices, list):
        return any(isinstance(c, dict) and c.get("finish_reason") == "tool_calls" for c in choices)
    response = payload.get("response", payload)
    output = response.get("output") if isinstance(response, dict) else None
    return isinstance(output, list) and any(
        isinstance(item, dict) and item.get("type") == "function_call" for item in output
    )


def calls_tool_in_tail(tail: Iterable[bytes]) -> bool:
    """Whether the stream's last chunks say its answer called a tool (``calls_tool``).

    The chat chunk with the ``finish_reason`` comes just before the usage
    chunk and ``[DONE]``; a Responses stream's last event holds the whole
    response.
    """
    data = b"".join(tail)
    if b"tool_calls" not in data and b"function_call" not in data:
        return False
    for line in data.split(b"\n"):
        if line.startswith(b"data:") and (b"tool_calls" in line or b"function_call" in line):
            try:
                if calls_tool(json.loads(line[5:])):
                    return True
            except ValueError:
                continue  # a frame cut by the start of the tail
    return False


def calls_tool_in_body(body: bytes) -> bool:
    """Whether a whole chat or Responses answer calls a tool (``calls_tool``)."""
    if b"tool_calls" not in body and b"function_call" not in body:
        return False
    try:
        return calls_tool(json.loads(body))
    except ValueError:
        return False


def _usage_of(payload: Any) -> dict[str, Any] | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if usage is None and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")  # Responses: response.completed
    return usage if isinstance(usage, dict) else None


@attrs.frozen
class OpenAI(Dialect):
    """An OpenAI route proxied as sent: the body, the answer and the stream as they are.

    Args:
      endpoint: ``chat/completions``, ``completions`` or ``responses``; the
        neuron's route of the same name serves it.
    """

    endpoint: str

    def parse(self, body: dict[str, Any], content: bytes) -> Request:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("model must be a non-empty string", param="model")
        return Request(name, body.get("stream") is True, (body, content))

    def to_upstream(self, gateway: Gateway, ex: Exchange, request: Request) -> Upstream:
        assert ex.model is not None
        body, content = request.data
        # Forward the body as it came unless the gateway changes it.
        if gateway.apply_defaults(ex.model, body, self.endpoint) or ex.model != request.model:
            body["model"] = ex.model
            content = json.dumps(body).encode()
        ex.prompt = affinity.prompt_of(content, affinity.session_key(ex.session, body))
        return Upstream(f"/v1/{self.endpoint}", content)

    def answer(self, ex: Exchange) -> Answer:
        assert ex.response is not None
        ex.status = ex.response.status
        ex.usage = usage_from_body(ex.first)
        ex.follows = calls_tool_in_body(ex.first)
        return Answer(ex.status, self._content_type(ex), ex.first)

    def stream_type(self, ex: Exchange) -> bytes:
        # Started early, the stream's head goes out before the neuron's.
        return EVENT_STREAM if ex.response is None else self._content_type(ex)

    @staticmethod
    def _content_type(ex: Exchange) -> bytes:
        assert ex.response is not None
        return ex.response.headers.get("content-type", "application/json").encode("latin-1")

    def early_start(self, ex: Exchange, upstream: Upstream) -> bytes | None:
        # Chat and completions: comments alone. A role-only chunk now would
        # fake the time to first token (WIRE.md).
        if self.endpoint != "responses":
            return sse.KEEP_ALIVE
        # Responses: created and in_progress now, as OpenAI sends them, with
        # what the neuron's own would say (it echoes the same body); the
        # relay then drops the neuron's and renumbers the rest.
        assert ex.model is not None
        try:
            req = responses.parse_responses_request(json.loads(upstream.content))
        except (ValueError, InvalidRequest):
            return None  # the neuron refuses it: that stays a 400
        ex.early = responses.ResponsesStream(
            id=responses.new_response_id(),
            created_at=openai.now(),
            model=ex.model,
            echo=req.echo,
        )
        return _encode(ex.early.start())

    def keep_alive(self, ex: Exchange) -> bytes:
        return sse.KEEP_ALIVE

    def stream_error(self, ex: Exchange, exc: CortexError) -> bytes:
        # Responses: a stream's frames are all Responses events (the AI
        # SDK's provider validates each), so it ends with response.failed,
        # as the neuron's own do; chat and completions with an error chunk.
        if self.endpoint != "responses":
            return sse.encode(openai.error_body(exc))
        if ex.early is None:  # cut before the relay saw a byte
            assert ex.model is not None
            ex.early = responses.RelayedResponse(model=ex.model)
        return _encode(ex.early.fail(exc.message, code=exc.code or exc.kind))

    async def relay(self, gateway: Gateway, ex: Exchange) -> AsyncGenerator[bytes, None]:
        """The stream byte for byte; its ``stream_error`` if the neuron fails.

        A Responses stream started early goes on as the response it began
        (``ResponsesStream.adopt``): its events are re-encoded. Any other is
        watched (``RelayedResponse``) for the id and the numbering an end
        the gateway adds must have.
        """
        tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_CHUNKS)
        chunk: bytes | None = ex.first
        adopt: Callable[[bytes], bytes] | None = None
        watch: Callable[[bytes], None] | None = None
        if isinstance(ex.early, responses.ResponsesStream):
            adopt = _adopter(ex.early)
        elif self.endpoint == "responses":
            assert ex.model is not None
            ex.early = responses.RelayedResponse(model=ex.model)
            watch = _watcher(ex.early)
        while chunk is not None:
            if adopt is not None:
                chunk = adopt(chunk)
            elif watch is not None:
                watch(chunk)
            if chunk:
                tail.append(chunk)
                yield chunk
            try:
                chunk = await gateway.proxy.next_chunk(ex)
            except CortexError as exc:
                ex.status, ex.usage = exc.status, usage_from_tail(tail)
                ex.error = log_summary(exc)
                yield self.stream_error(ex, exc)
                return
        ex.status, ex.usage = 200, usage_from_tail(tail)
        ex.follows = calls_tool_in_tail(tail)


def _adopter(stream: responses.ResponsesStream) -> Callable[[bytes], bytes]:
    """Chunks of the neuron's Responses stream -> the events ``stream`` goes on with."""
    decoder = sse.SSEDecoder()

    def adopt(chunk: bytes) -> bytes:
        out = []
        for event in decoder.feed(chunk):
            try:
                payload = json.loads(event.data)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("type"), str):
                out += [sse.encode(p, event=n) for n, p in stream.adopt(payload)]
            else:
                out.append(sse.encode(event.data, event=event.event))  # as it came
        return b"".join(out)

    return adopt


def _watcher(relayed: responses.RelayedResponse) -> Callable[[bytes], None]:
    """Chunks of the neuron's Responses stream, relayed as they are -> ``relayed``."""
    decoder = sse.SSEDecoder()

    def watch(chunk: bytes) -> None:
        for event in decoder.feed(chunk):
            relayed.see(event.data)

    return watch


# -- Anthropic: translated ----------------------------------------------------------


async def count_input(gateway: Gateway, ex: Exchange, body: dict[str, Any]) -> int:
    """The prompt's tokens by the neuron's tokenizer; 0 when it cannot say.

    Asked of a neuron that has the model loaded (during a cold load, once
    it is), without ``Router.acquire``: that would take a request slot from
    the very generation this counts for.
    """
    state = gateway.state
    try:
        with trio.fail_after(gateway.config.gateway.load_timeout):
            while True:
                loaded = [n for n in state.routable() if n.serves(ex.model or "")]
                if loaded:
                    break
                await state.wait_changed()
        content = json.dumps(body).encode()
        answer = await gateway.proxy.post(loaded[0], "/tokenize", content, ex.request_id)
        return int(json.loads(answer)["count"])
    except (CortexError, trio.TooSlowError) as exc:
        log.debug("request %s: no input token count: %s", ex.request_id, exc)
    except (ValueError, KeyError, TypeError) as exc:
        log.debug("request %s: no input token count: bad answer: %s", ex.request_id, exc)
    return 0


def _prompt(chat: dict[str, Any]) -> dict[str, Any]:
    """The part of a chat body the prompt is made of: what ``/tokenize`` counts."""
    body = {"model": chat["model"], "messages": chat["messages"]}
    for key in ("tools", "continue_final_message"):
        if chat.get(key):
            body[key] = chat[key]
    return body


@attrs.frozen
class Messages(Dialect):
    """``/v1/messages``: Anthropic in, chat completions to the neuron, Anthropic out."""

    endpoint: str = "messages"
    errors: str = envelope.ANTHROPIC

    def parse(self, body: dict[str, Any], content: bytes) -> Request:
        req = anthropic.parse_messages_request(body)
        return Request(req.model, req.stream, req)

    def to_upstream(self, gateway: Gateway, ex: Exchange, request: Request) -> Upstream:
        assert ex.model is not None
        chat = translate.anthropic_to_openai(request.data, model=ex.model)
        gateway.apply_defaults(ex.model, chat, "chat/completions")
        content = json.dumps(chat).encode()
        session = affinity.session_key(ex.session, {"metadata": request.data.metadata or {}})
        ex.prompt = affinity.prompt_of(content, session)
        return Upstream(
            "/v1/chat/completions",
            content,
            _prompt(chat) if ex.stream else None,
            translate.anthropic_fields(request.data),
        )

    async def send(self, gateway: Gateway, ex: Exchange, upstream: Upstream) -> None:
        try:
            await self._send(gateway, ex, upstream)
        except CortexError as exc:
            raise translate.in_request_terms(exc, upstream.fields)

    async def _send(self, gateway: Gateway, ex: Exchange, upstream: Upstream) -> None:
        if upstream.count is None:
            await gateway.proxy.dispatch(ex, upstream.path, upstream.content)
            return
        count = upstream.count

        async def count_prompt() -> None:
            ex.prompt_tokens = await count_input(gateway, ex, count)

        # message_start carries the prompt's size: count it while the neuron
        # processes the prompt, waiting briefly past the first byte for the
        # count rather than delaying the stream.
        failure: CortexError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_prompt)
            try:
                await gateway.proxy.dispatch(ex, upstream.path, upstream.content)
            except CortexError as exc:
                failure = exc
                nursery.cancel_scope.cancel()
            else:
                nursery.cancel_scope.deadline = trio.current_time() + COUNT_GRACE
        if failure is not None:
            raise failure

    def answer(self, ex: Exchange) -> Answer:
        assert ex.model is not None
        try:
            message = translate.openai_to_anthropic(json.loads(ex.first), model=ex.model)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"neuron answered with a malformed completion: {exc}")
        ex.status, ex.usage = 200, message["usage"]
        ex.follows = message.get("stop_reason") == "tool_use"
        return Answer(200, JSON, json.dumps(message).encode())

    def _stream(self, ex: Exchange) -> translate.AnthropicStream:
        assert ex.model is not None
        if ex.early is None:
            ex.early = translate.AnthropicStream(
                message_id=anthropic.new_message_id(),
                model=ex.model,
                input_tokens=ex.prompt_tokens,
            )
        return ex.early

    def early_start(self, ex: Exchange, upstream: Upstream) -> bytes | None:
        # message_start now, as Anthropic's API sends it: its usage is the
        # prompt's count so far, the cache split then in message_delta.
        return _encode(self._stream(ex).start())

    def keep_alive(self, ex: Exchange) -> bytes:
        return _encode(self._stream(ex).keep_alive())

    def stream_error(self, ex: Exchange, exc: CortexError) -> bytes:
        return _encode(
            self._stream(ex).error(anthropic.message_for(exc), status=anthropic.status_for(exc))
        )

    async def relay(self, gateway: Gateway, ex: Exchange) -> AsyncGenerator[bytes, None]:
        """The neuron's chat stream as Anthropic events."""
        stream = self._stream(ex)
        decoder = sse.SSEDecoder()

        def feed(chunk: bytes) -> tuple[list[tuple[str, dict[str, Any]]], int | None]:
            """Events for ``chunk``, and the status if the stream failed in it."""
            events: list[tuple[str, dict[str, Any]]] = []
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    continue
                try:
                    data = json.loads(event.data)
                except ValueError:
                    return events + stream.error("neuron sent a malformed chunk", status=502), 502
                if not isinstance(data, dict):
                    continue
                if data.get("usage"):
                    ex.usage = data["usage"]
                events += stream.feed(data)
                if "error" in data:  # the neuron's own mid-stream error
                    return events, 500
            return events, None

        # message_start comes with the first chunk's events: it carries the
        # chunk's prompt_usage, the prompt's cached part included.
        chunk: bytes | None = ex.first
        while chunk is not None:
            events, failed = feed(chunk)
            if events:
                yield _encode(events)
            if failed is not None:
                ex.status = failed
                return
            try:
                chunk = await gateway.proxy.next_chunk(ex)
            except CortexError as exc:
                ex.status, ex.error = anthropic.status_for(exc), log_summary(exc)
                yield _encode(stream.error(anthropic.message_for(exc), status=ex.status))
                return
        # No finish_reason: the neuron's stream was cut short, and finish()
        # ends it with an error event.
        if not stream.complete:
            ex.error = "upstream_error: the neuron's stream ended early"
        ex.status = 200 if stream.complete else 502
        # What the client is told: tool_use when a tool_use block is in the answer.
        ex.follows = stream.stop_reason == "tool_use"
        yield _encode(stream.finish())


def _encode(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(sse.encode(payload, event=name) for name, payload in events)


@attrs.frozen
class CountTokens(Dialect):
    """``/v1/messages/count_tokens``: the prompt's tokens by the model's own tokenizer.

    The tokenizer lives with the model: this routes (and cold loads when
    needed) exactly like a generation would.
    """

    endpoint: str = "messages/count_tokens"
    errors: str = envelope.ANTHROPIC

    def parse(self, body: dict[str, Any], content: bytes) -> Request:
        req = anthropic.parse_count_tokens_request(body)
        return Request(req.model, False, req)

    def to_upstream(self, gateway: Gateway, ex: Exchange, request: Request) -> Upstream:
        chat = translate.anthropic_to_openai(request.data, model=ex.model)
        return Upstream("/tokenize", json.dumps(chat).encode())

    def answer(self, ex: Exchange) -> Answer:
        try:
            count = int(json.loads(ex.first)["count"])
        except (ValueError, KeyError, TypeError) as exc:
            name = ex.neuron.name if ex.neuron is not None else "?"
            raise UpstreamError(f"neuron {name} answered /tokenize without a count: {exc}")
        ex.status = 200
        return Answer(200, JSON, json.dumps(anthropic.count_tokens_response(count)).encode())


#: Path -> the dialect of each inference route.
ROUTES: dict[str, Dialect] = {
    "/v1/chat/completions": OpenAI("chat/completions"),
    "/v1/completions": OpenAI("completions"),
    "/v1/responses": OpenAI("responses"),
    "/v1/messages": Messages(),
    "/v1/messages/count_tokens": CountTokens(),
}
