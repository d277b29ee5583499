"""The OpenAI passthrough endpoints as a bare ASGI app in front of Quart.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` carry
nearly all of a gateway's traffic, and Quart's request and response
machinery (request context, routing, header objects, the body's events) is
pure overhead for them: contrib/bench/gateway.py measured about 0.3 ms of
gateway CPU per request less without it (5-10%; the rest is hypercorn and
the hop to the neuron). :class:`Passthrough` answers a POST to those paths
itself, straight from the ASGI scope, and hands everything else (other
paths, other methods, the lifespan) to the Quart app, so 405s, ``OPTIONS``
and every other route behave as Quart makes them.

What a client sees is what the Quart route sent before: the same status,
headers, error envelopes (``openai.error_body`` via ``error_parts``), body
limit, API keys, request ids and metrics, and streams byte for byte.

Cancellation: like quart-trio, a task watches for ``http.disconnect`` while
the request is proxied and cancels it when the client goes away, so the
relay's ``finally`` closes the neuron's connection and the neuron stops
generating.

Resource handling: a streamed exchange is finished (neuron connection
closed, route released, metrics recorded) in a ``finally`` of the task that
dispatched it, not only in its relay's: a relay that never started (the
client left while the response head was sent) runs no ``finally``. Quart
sends a view's response after the view returns, so a Quart view that
returns a stream hands its exchange over (:func:`hand_over`) and
``Passthrough`` finishes it once Quart is done with the request.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from werkzeug.exceptions import InternalServerError

from cortex.errors import CortexError, InvalidRequest, PayloadTooLarge
from cortex.gateway.metrics import UNKNOWN
from cortex.gateway.proxy import CLIENT_CLOSED, Exchange, abandoned_status, usage_from_body
from cortex.wire.envelope import error_parts

if TYPE_CHECKING:
    from cortex.gateway.app import Gateway

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Path -> the endpoint label of the metrics.
OPENAI_ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
}

_WANTED = frozenset({b"x-request-id", b"x-api-key", b"authorization", b"content-length"})
_JSON = b"application/json"
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: The scope key of the exchanges a Quart view handed over with its response.
_HANDED_OVER = "cortex.exchanges"


#: Path -> the endpoint label of the routes the Quart app serves (errors only).
_ROUTE_LABELS = {
    **OPENAI_ENDPOINTS,
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "messages/count_tokens",
    "/v1/models": "models",
    "/fleet": "fleet",
    "/health": "health",
    "/admin/reload": "admin/reload",
}


def route_label(path: str) -> str:
    """The endpoint label for ``path``: one of a fixed few (``other`` for any unknown path)."""
    if path.startswith("/v1/models/"):
        return "models"
    return _ROUTE_LABELS.get(path, "other")


class _Answer:
    """What an ASGI app sent: the status and request id of its response head."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.request_id: str | None = None

    def watch(self, send: Send) -> Send:
        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        self.request_id = value.decode("latin-1")
            await send(message)

        return watched


class ClientGone(Exception):
    """The client hung up before its request body was complete."""


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def hand_over(scope: Scope, ex: Exchange) -> None:
    """Let ``Passthrough`` finish ``ex`` if the stream a Quart view returns never runs.

    Args:
      scope: the request's ASGI scope (Quart's ``request.scope``).
      ex: the exchange the view's streamed response relays.
    """
    scope[_HANDED_OVER].append(ex)


def _headers(scope: Scope) -> dict[bytes, str]:
    """The few request headers the passthrough reads (the first of each name)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


class Passthrough:
    """ASGI app: the OpenAI passthrough POSTs, then ``app`` for the rest.

    Args:
      gateway: what the requests are served with.
      app: the ASGI app for everything else (the gateway's Quart app).
    """

    def __init__(self, gateway: Gateway, app: Any) -> None:
        self.gateway = gateway
        self.app = app
        self.limit = gateway.config.gateway.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in OPENAI_ENDPOINTS
        ):
            await self.serve(scope, receive, send)
        elif scope["type"] == "http":
            handed_over: list[Exchange] = []
            answer = _Answer()
            try:
                await self.app({**scope, _HANDED_OVER: handed_over}, receive, answer.watch(send))
            finally:
                for ex in handed_over:
                    self.gateway.proxy.finish(ex, status=CLIENT_CLOSED)
                self.record(scope, answer)
        else:
            await self.app(scope, receive, send)

    def record(self, scope: Scope, answer: _Answer) -> None:
        """Log and count a request the Quart app answered.

        The Anthropic messages route records its own exchange (with model
        and neuron) like the passthrough does; every other route's errors
        are counted here, so that no non-2xx answer goes uncounted.
        """
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/messages":
            return
        request_id = answer.request_id or _headers(scope).get(b"x-request-id", "-")
        status = answer.status if answer.status is not None else CLIENT_CLOSED
        quiet = status < 400 and not path.startswith("/v1/") and method != "POST"
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %d request_id=%s",
            method,
            path,
            status,
            request_id,
        )
        if status >= 400:
            self.gateway.metrics.errors.labels(route_label(path), UNKNOWN, str(status)).inc()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        request_id = headers.get(b"x-request-id") or new_request_id()
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.exchange(scope["path"], headers, request_id, receive, tracked)
        except Exception:
            # What Quart answers for an error in a view: a 500 in the envelope.
            log.exception("request %s failed", request_id)
            if not started:
                error = CortexError(InternalServerError.description or "internal error")
                await self.send_error(send, error, request_id)

    async def exchange(
        self,
        path: str,
        headers: dict[bytes, str],
        request_id: str,
        receive: Receive,
        send: Send,
    ) -> None:
        gateway = self.gateway
        ex = Exchange(
            endpoint=OPENAI_ENDPOINTS[path], request_id=request_id, started=trio.current_time()
        )
        try:
            gateway.check_key(headers.get(b"x-api-key"), headers.get(b"authorization"))
            content = await self.read_body(receive, headers.get(b"content-length"))
            body = gateway.parse_json(content)
            await gateway.ready()
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise InvalidRequest("model must be a non-empty string", param="model")
            ex.model = gateway.router.resolve(name)
            # Forward the body as it came unless the gateway changes it.
            if gateway.apply_defaults(ex.model, body, ex.endpoint) or ex.model != name:
                body["model"] = ex.model
                content = json.dumps(body).encode()
            ex.stream = body.get("stream") is True
        except ClientGone:
            gateway.count_error(ex, CLIENT_CLOSED)
            return
        except CortexError as exc:
            gateway.count_error(ex, exc.status)
            await self.send_error(send, exc, request_id)
            return
        except BaseException as exc:
            gateway.count_error(ex, abandoned_status(exc))
            raise
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                await self.respond(ex, path, content, send)
            finally:
                nursery.cancel_scope.cancel()

    async def respond(self, ex: Exchange, path: str, content: bytes, send: Send) -> None:
        """Proxy ``ex`` and send the answer (runs cancelled if the client goes away)."""
        proxy = self.gateway.proxy
        try:
            await proxy.dispatch(ex, path, content)
        except CortexError as exc:
            self.gateway.count_error(ex, exc.status)
            await self.send_error(send, exc, ex.request_id)
            return
        except BaseException as exc:
            self.gateway.count_error(ex, abandoned_status(exc))
            raise
        response = ex.response
        assert response is not None
        content_type = response.headers.get("content-type", "application/json").encode("latin-1")
        id_header = (b"x-request-id", ex.request_id.encode("latin-1"))
        if not ex.stream:
            proxy.finish(ex, status=response.status, usage=usage_from_body(ex.first))
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (b"content-type", content_type),
                        (b"content-length", b"%d" % len(ex.first)),
                        id_header,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": ex.first})
            return
        relay = proxy.relay(ex)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", content_type), *_SSE_HEADERS, id_header],
                }
            )
            async for chunk in relay:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            # The relay's finally finishes the exchange (a 499 if cancelled
            # mid-stream); one never started (the client left while the
            # head was sent) has no finally to run: finishing again is a no-op.
            await relay.aclose()
            proxy.finish(ex, status=CLIENT_CLOSED)

    async def read_body(self, receive: Receive, declared: str | None) -> bytes:
        """The request body, within ``max_body_bytes``.

        Raises:
          PayloadTooLarge: declared or sent over the limit.
          ClientGone: the client disconnected first.
        """
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise self.too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.limit:
                    raise self.too_large()
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body over the {self.limit}-byte limit")

    async def send_error(self, send: Send, exc: CortexError, request_id: str) -> None:
        status, body, headers = error_parts(exc, request_id=request_id)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", _JSON),
                    (b"content-length", b"%d" % len(body)),
                    *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
