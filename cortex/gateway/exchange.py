"""The exchange pipeline: every inference route, whatever its dialect, on one path.

:class:`Pipeline` is the gateway's ASGI app. A POST to an inference route
(``cortex.gateway.dialects.ROUTES``: chat completions, completions,
responses, messages, count_tokens) runs through :meth:`Pipeline.exchange`,
straight from the ASGI scope:

1. read the body and the key (413, 401, 400 in the route's dialect);
2. ``dialect.parse`` the body, wait for the first polls after a start,
   resolve the model (404, or 503 / 529 with Retry-After);
3. ``dialect.to_upstream``, then ``dialect.send`` it: routed and retried
   before the first byte (``Proxy.dispatch``);
4. answer: ``dialect.answer`` for a whole body, ``dialect.relay`` for a
   stream (chunks as they arrive), ``dialect.error`` for any error before
   the first byte of the answer;
5. finish: ``Proxy.finish`` closes the neuron's response, releases the
   route and records the exchange, just before the answer's last bytes go
   out (a client that has its answer finds it counted), or in the
   ``finally`` for an exchange that ended any other way.

Everything else (the other methods of these paths, other paths, the
lifespan) goes to the control app (Quart: the catalogue, health, admin),
whose answers are logged and, errors, counted here.

With ``[gateway] cors_origins`` set, a request from an allowed origin is
seen first: a preflight is answered here on any route, with no key asked
(browsers send none), and every other answer to it, either app's, gets the
CORS headers (``cortex.gateway.cors``).

Web frameworks' request machinery (request context, routing, header
objects, body events) is pure overhead on this path: contrib/bench/gateway.py
measured about 0.3 ms of gateway CPU per request less without Quart.

Cancellation: like quart-trio, a task watches for ``http.disconnect`` while
the request is proxied and cancels it when the client goes away, so the
neuron's connection is closed and the neuron stops generating (logged 499).
At shutdown the proxy ends what is still running after ``grace_period``
(``Proxy.stop``): an error answer, or the stream's error event, and 503 in
the log; what the server itself cuts after that, or at once on a second
signal, is logged as cut and counted 503, a stream ending with its error
event (``Pipeline.cut_short``).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from cortex.errors import CortexError, PayloadTooLarge, Unavailable, log_summary, summary_line
from cortex.gateway.affinity import SESSION_HEADER
from cortex.gateway.context import Gateway
from cortex.gateway.cors import CorsPolicy, Preflight
from cortex.gateway.dialects import JSON, ROUTES, Dialect, Upstream
from cortex.gateway.metrics import UNKNOWN
from cortex.gateway.proxy import CLIENT_CLOSED, SHUT_DOWN, Exchange
from cortex.wire import envelope, jsonbody

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_WANTED = frozenset(
    {
        b"x-request-id",
        b"x-api-key",
        b"authorization",
        b"content-length",
        b"content-encoding",
        SESSION_HEADER,
    }
)
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_METHODS = ("OPTIONS", "POST")
_ALLOW = (b"allow", ", ".join(_METHODS).encode())
#: Bytes of an error answer's body kept to say on its log line why it was given.
_ERROR_BODY_BYTES = 4096
#: Seconds a stream the server cuts at once gets to send its error event.
CUT_NOTICE_S = 0.5
#: Seconds without the neuron's first byte after which a stream is started
#: anyway, and then kept alive every ``KEEP_ALIVE_S``: Claude Code gives up
#: on a stream silent for 300 s, nginx (``proxy_read_timeout``) after 60 s.
EARLY_START_S = 10.0
KEEP_ALIVE_S = 10.0

#: Path -> the endpoint label of the control app's routes.
_CONTROL_LABELS = {
    "/": "root",
    "/v1/models": "models",
    "/fleet": "fleet",
    "/health": "health",
    "/admin/reload": "admin/reload",
}


def route_label(path: str) -> str:
    """The endpoint label for ``path``: one of a fixed few (``other`` for any unknown path)."""
    if path in ROUTES:
        return ROUTES[path].endpoint
    if path.startswith("/v1/models/"):
        return "models"
    return _CONTROL_LABELS.get(path, "other")


def error_dialect(path: str) -> str:
    """The envelope dialect of errors under ``path``: Anthropic's under ``/v1/messages``."""
    return envelope.ANTHROPIC if path.startswith("/v1/messages") else envelope.OPENAI


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class ClientGone(Exception):
    """The client hung up before its request body was complete."""


class _Answered:
    """What an ASGI app sent: the status and request id of its response head,
    and an error answer's body, for the log line that says why.

    A head without ``x-request-id`` (the control app's answers but its
    errors) gets ``request_id``: every answer carries one.
    """

    def __init__(self, request_id: str) -> None:
        self.status: int | None = None
        self.request_id = request_id
        self._error_body = b""

    def watch(self, send: Send) -> Send:
        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                headers = list(message.get("headers", ()))
                for name, value in headers:
                    if name.lower() == b"x-request-id":
                        self.request_id = value.decode("latin-1")
                        break
                else:
                    headers.append((b"x-request-id", self.request_id.encode("latin-1")))
                    message = {**message, "headers": headers}
            elif (self.status or 0) >= 400 and len(self._error_body) < _ERROR_BODY_BYTES:
                self._error_body += message.get("body", b"")
            await send(message)

        return watched

    def error(self) -> str | None:
        """Why an error answer was given, from its envelope (either dialect); None if none."""
        try:
            body = json.loads(self._error_body)
            error = body["error"]
            return summary_line(str(error.get("code") or error["type"]), str(error["message"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _headers(scope: Scope) -> dict[bytes, str]:
    """The few request headers the pipeline reads (the first of each name)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


class Pipeline:
    """ASGI app: the inference routes, then ``control`` for the rest.

    Args:
      gateway: what the requests are served with.
      control: the ASGI app for everything else (the gateway's Quart app).
      control_methods: the methods ``control`` serves on a path (none: an
        unknown path), which a CORS preflight is answered with.
    """

    def __init__(
        self,
        gateway: Gateway,
        control: Any,
        control_methods: Callable[[str], Sequence[str]],
    ) -> None:
        self.gateway = gateway
        self.control = control
        self.control_methods = control_methods
        self.limit = gateway.config.gateway.max_body_bytes
        self.cors = CorsPolicy.from_config(gateway.config.gateway.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control(scope, receive, send)
            return
        if self.cors is not None:
            asked = self.cors.allowed(scope)
            if asked is not None:
                if asked.method is not None and await self.preflight(asked, scope, receive, send):
                    return
                send = self.cors.tag(send, asked.origin)
        dialect = ROUTES.get(scope["path"])
        if dialect is None:
            answered = _Answered(_request_id(_headers(scope)))
            try:
                await self.control(scope, receive, answered.watch(send))
            finally:
                self.record(scope, answered)
        elif scope["method"] == "POST":
            await self.serve(dialect, scope, receive, send)
        else:
            await self.refuse_method(dialect, scope, receive, send)

    def record(self, scope: Scope, answered: _Answered) -> None:
        """Log and count a request the control app answered, so no error goes uncounted."""
        method, path = scope["method"], scope["path"]
        status = answered.status if answered.status is not None else CLIENT_CLOSED
        self.log_and_count(method, path, status, answered.request_id, answered.error())

    def log_and_count(
        self, method: str, path: str, status: int, request_id: str, error: str | None = None
    ) -> None:
        """Log and count a request that no exchange recorded: in requests, errors in errors too.

        ``error``: why it was answered with an error, for its log line.
        """
        quiet = (
            status < 400
            and method != "POST"
            and (method == "OPTIONS" or not path.startswith("/v1/"))
        )
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %d request_id=%s%s",
            method,
            path,
            status,
            request_id,
            f" error={error}" if error else "",
        )
        metrics, label = self.gateway.metrics, route_label(path)
        metrics.requests.labels(label, UNKNOWN, "").inc()
        if status >= 400:
            metrics.errors.labels(label, UNKNOWN, str(status)).inc()

    async def drain(self, scope: Scope, receive: Receive) -> str:
        """Read a body no answer needs (see exchange(): the request's end first); its request id."""
        try:
            await self.read_body(receive, None)
        except (ClientGone, PayloadTooLarge):
            pass
        return _request_id(_headers(scope))

    async def preflight(self, asked: Preflight, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer a CORS preflight from an allowed origin: 204 with the route's methods.

        Returns:
          False for a path no route serves: the control app answers it (404).
        """
        path = scope["path"]
        methods = _METHODS if path in ROUTES else self.control_methods(path)
        if not methods:
            return False
        request_id = await self.drain(scope, receive)
        headers = [
            *_raw(envelope.id_headers(request_id, error_dialect(path))),
            *CorsPolicy.preflight_headers(asked, methods),
        ]
        self.log_and_count(scope["method"], path, 204, request_id)
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True

    async def refuse_method(
        self, dialect: Dialect, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer a method other than POST on an inference route: OPTIONS, or a 405."""
        request_id = await self.drain(scope, receive)
        if scope["method"] == "OPTIONS":
            headers = [_ALLOW, (b"content-length", b"0"), *dialect.id_headers(request_id)]
            self.log_and_count(scope["method"], scope["path"], 200, request_id)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        exc = envelope.route_error(405, scope["method"], scope["path"], allowed=["POST"])
        status, body, headers = dialect.error(exc, request_id)
        self.log_and_count(scope["method"], scope["path"], status, request_id, log_summary(exc))
        await _send_json(send, status, body, headers, [_ALLOW])

    async def serve(self, dialect: Dialect, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one exchange; finish it however it ends."""
        headers = _headers(scope)
        ex = Exchange(
            endpoint=dialect.endpoint,
            request_id=_request_id(headers),
            started=trio.current_time(),
            session=headers.get(SESSION_HEADER),
        )
        responded = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal responded
            responded = True
            await send(message)

        try:
            await self.exchange(dialect, ex, headers, receive, tracked)
        except Exception:
            # A bug: what a web framework answers for an error in a view.
            log.exception("request %s failed", ex.request_id)
            if not responded:
                error = CortexError("the gateway failed to answer: an internal error")
                await self.send_error(send, dialect, ex, error)
            else:
                ex.status = 500
        finally:
            # A client that leaves cancels the exchange from inside, which
            # then ends; cancelled from outside, it is the server cutting
            # what is left once the shutdown's grace period is over.
            if not ex.finished and trio.current_effective_deadline() == -math.inf:
                ex.status = SHUT_DOWN
                await self.cut_short(send, dialect, ex, head_sent=responded)
            # Cancelled, or failed: a no-op after the answer's own.
            self.gateway.proxy.finish(ex)

    async def cut_short(
        self, send: Send, dialect: Dialect, ex: Exchange, *, head_sent: bool
    ) -> None:
        """Say that the server cut ``ex`` at once (a second signal, or the drain's end).

        A stream under way ends with the dialect's error event, if the
        client takes it within ``CUT_NOTICE_S``; any other answer is cut.

        Cancellation: called while cancelled; shielded, with its own deadline.
        """
        sent = ex.stream and head_sent
        error = Unavailable("the gateway stopped at once: the answer was cut short")
        ex.error = log_summary(error) + ("" if sent else " (no error answer sent)")
        if not sent:
            return
        event = dialect.stream_error(ex, error)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CUT_NOTICE_S):
            await send({"type": "http.response.body", "body": event, "more_body": False})

    async def exchange(
        self,
        dialect: Dialect,
        ex: Exchange,
        headers: dict[bytes, str],
        receive: Receive,
        send: Send,
    ) -> None:
        gateway = self.gateway
        body: dict[str, Any] | None = None
        try:
            # The body before any answer, a refusal too: answered before
            # hypercorn has seen the request's end, a keep-alive connection
            # is closed now and then under the client's next request.
            content = await self.read_body(receive, headers.get(b"content-length"))
            gateway.check_key(headers.get(b"x-api-key"), headers.get(b"authorization"))
            # Decoded here: what goes on to a neuron is the plain body.
            content = jsonbody.decode(content, headers.get(b"content-encoding"), limit=self.limit)
            body = jsonbody.loads_object(content, dotted=dialect.errors == envelope.ANTHROPIC)
            request = dialect.parse(body, content)
            await gateway.ready()
            ex.asked = request.model
            ex.model = gateway.router.resolve(request.model)
            ex.stream = request.stream
            upstream = dialect.to_upstream(gateway, ex, request)
        except ClientGone:
            return
        except CortexError as exc:
            if ex.model is None and body is not None and isinstance(body.get("model"), str):
                # Labelled by the model the body names, whichever check refused it.
                ex.model = gateway.router.label(body["model"])
            await self.send_error(send, dialect, ex, exc)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                try:
                    if not ex.stream:
                        await dialect.send(gateway, ex, upstream)
                    elif await self.send_early(dialect, ex, upstream, send):
                        return  # started early, ended with its error event
                    answer = None if ex.stream else dialect.answer(ex)
                except CortexError as exc:
                    await self.send_error(send, dialect, ex, exc)
                    return
                if answer is not None:
                    gateway.proxy.finish(ex)
                    await _send_json(
                        send,
                        answer.status,
                        answer.body,
                        [],
                        dialect.id_headers(ex.request_id),
                        content_type=answer.content_type,
                    )
                else:
                    await self.stream(dialect, ex, send)
            finally:
                nursery.cancel_scope.cancel()

    async def send_early(
        self, dialect: Dialect, ex: Exchange, upstream: Upstream, send: Send
    ) -> bool:
        """``dialect.send`` for a stream, starting the answer if the first byte is slow.

        Once ``EARLY_START_S`` pass without the neuron's first byte (a long
        prompt, a cold load), the stream gets its head and the dialect's
        ``early_start`` events, then its ``keep_alive`` every
        ``KEEP_ALIVE_S``: clients and proxies that give up on a silent
        stream (Claude Code after 300 s, nginx after 60 s) wait. The
        request is still routed and retried meanwhile; a failure after the
        head is the stream's ``stream_error`` event, the status recorded as
        the dialect would have answered it. Streams whose first byte comes
        sooner are untouched, and errors before it stay error answers.

        Returns:
          True when the stream was started early and has ended with an error
          (recorded); False when ``ex`` is ready for ``stream``.

        Raises:
          CortexError: the request failed before anything was sent.
        """
        done = trio.Event()
        failure: CortexError | None = None

        async def forward() -> None:
            nonlocal failure
            try:
                await dialect.send(self.gateway, ex, upstream)
            except CortexError as exc:
                failure = exc
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            with trio.move_on_after(EARLY_START_S):
                await done.wait()
            opening = None if done.is_set() else dialect.early_start(ex, upstream)
            if opening is not None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": self.head(dialect, ex),
                    }
                )
                await send({"type": "http.response.body", "body": opening, "more_body": True})
                ex.head_sent = True
                while not done.is_set():
                    with trio.move_on_after(KEEP_ALIVE_S):
                        await done.wait()
                    if not done.is_set():
                        body = dialect.keep_alive(ex)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
        if failure is None:
            return False
        if not ex.head_sent:
            raise failure
        ex.status, ex.error = dialect.error(failure, ex.request_id)[0], log_summary(failure)
        self.gateway.proxy.finish(ex)
        await send({"type": "http.response.body", "body": dialect.stream_error(ex, failure)})
        return True

    def head(self, dialect: Dialect, ex: Exchange) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", dialect.stream_type(ex)),
            *_SSE_HEADERS,
            *dialect.id_headers(ex.request_id),
        ]

    async def stream(self, dialect: Dialect, ex: Exchange, send: Send) -> None:
        """Send the stream's head (unless it was started early), then its relay as it comes."""
        relay = dialect.relay(self.gateway, ex)
        try:
            if not ex.head_sent:
                head = self.head(dialect, ex)
                await send({"type": "http.response.start", "status": 200, "headers": head})
            async for chunk in relay:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.gateway.proxy.finish(ex)
            await send({"type": "http.response.body", "body": b""})
        finally:
            # A relay cut off (the client left) closes here, not when collected.
            await relay.aclose()

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

    async def send_error(
        self, send: Send, dialect: Dialect, ex: Exchange, exc: CortexError
    ) -> None:
        """Record ``ex`` as answered with ``exc``, then send that answer."""
        status, body, headers = dialect.error(exc, ex.request_id)
        ex.status, ex.error = status, log_summary(exc)
        self.gateway.proxy.finish(ex)
        await _send_json(send, status, body, headers, [])


def _request_id(headers: dict[bytes, str]) -> str:
    """The client's ``x-request-id``, or a new one."""
    return headers.get(b"x-request-id") or new_request_id()


def _raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]],
    raw_headers: list[tuple[bytes, bytes]],
    *,
    content_type: bytes = JSON,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *_raw(headers),
                *raw_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
