"""Proxying one request to a neuron: retries before the first byte, reads after.

``Proxy.dispatch`` routes the request, sends it, and waits for the first
byte of the answer (a stream's first chunk, or a whole non-streamed body).
A neuron that cannot be reached or drops the connection before that byte is
marked suspect and the request moves to the next route; a neuron that says
it does not have the model is forgotten for it and the request is routed
again (which may load it). After the first byte the request is committed:
its dialect (``cortex.gateway.dialects``) relays the rest, chunk by chunk
from ``next_chunk``, and ``finish`` ends the exchange.

The hop to the neuron is ``cortex.gateway.hop`` (HTTP/1.1 on trio streams,
one pool of keep-alive connections per neuron), not httpx: httpx and
httpcore cost about half of the gateway's CPU per request. Its timeouts
are the cancel scopes here: the connect, the first byte, each chunk.

Waits on a neuron can be cut short by the fleet (``Proxy.cut``): the
requests waiting for a neuron's first byte fail over to the next route as
soon as its poller marks it down (``Proxy.watch_fleet``), not after
``first_byte_timeout``, and so do those waiting on a model its poller
marks stalled there (its engine made no progress for ``stall_timeout``);
at shutdown, after ``grace_period``, every wait still open ends with a
503 the client's dialect renders (the error answer, or a stream's error
event), before the server cuts the connections.

Resource handling: ``finish`` closes the upstream response, releases the
route and records the exchange, once; the exchange pipeline
(``cortex.gateway.exchange``) calls it before the answer's last bytes go
out, and again in a ``finally`` for an exchange that ended any other way
(cancelled, failed). A client that goes away thus closes the neuron's
connection and the neuron stops generating; only a response read to its
end gives its connection back for the next request.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from cortex.config import GatewaySection
from cortex.errors import (
    CortexError,
    ModelNotFound,
    NeuronUnreachable,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from cortex.gateway import hop
from cortex.gateway.affinity import Prompt
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.router import Router
from cortex.gateway.state import NeuronState
from cortex.gateway.upstream import error_from_response

log = logging.getLogger(__name__)

#: A client that went away, in the error metrics (nginx's number for it).
CLIENT_CLOSED = 499
#: An exchange the gateway's shutdown cut short, in the log and the metrics.
SHUT_DOWN = 503


@attrs.define(eq=False)
class Exchange:
    """One request on its way through the gateway."""

    #: The endpoint label of the metrics (``chat/completions``, ``messages``).
    endpoint: str
    request_id: str
    started: float
    #: The model to route to (an alias or a tier resolved).
    model: str | None = None
    #: The model as the client named it.
    asked: str | None = None
    stream: bool = False
    neuron: NeuronState | None = None
    #: The neuron last sent the request, answered or not (what the log and
    #: metrics name for a request given up before its first byte).
    tried: NeuronState | None = None
    #: The neuron's response; a stream's later chunks are read from it.
    response: hop.Response | None = None
    #: A stream's first chunk, or the whole body when not streaming.
    first: bytes = b""
    first_at: float | None = None
    #: The client's session key (``cortex.gateway.affinity.SESSION_HEADER``), if sent.
    session: str | None = None
    #: The prompt as session affinity sees it (None: no affinity, count_tokens).
    prompt: Prompt | None = None
    #: The prompt's tokens, counted before the answer starts (0: not counted).
    prompt_tokens: int = 0
    #: The status to record: what the client was answered, or how it ended.
    status: int = CLIENT_CLOSED
    #: Why it was answered with an error (``errors.log_summary``), for its log line.
    error: str | None = None
    #: The usage the answer reported (OpenAI, Responses or Anthropic), if any.
    usage: dict[str, Any] | None = None
    #: The answer called a tool (chat ``finish_reason: "tool_calls"``, a
    #: Responses ``function_call`` item): the client will send the
    #: conversation again with the tool's result (``Router.release(follows=)``).
    follows: bool = False
    finished: bool = False
    #: The dialect's state for a stream under way: set by ``Dialect.early_start``
    #: for one started before the neuron's first byte, or by the relay; what
    #: ``Dialect.stream_error`` ends it from. None: neither yet.
    early: Any = None
    #: The stream's head went out before the neuron's first byte.
    head_sent: bool = False


@attrs.define(eq=False)
class _Wait:
    """A wait on a neuron's answer that ``Proxy.cut`` may end early."""

    neuron: NeuronState
    scope: trio.CancelScope
    #: Waiting for the first byte (a neuron that goes down fails it over).
    first_byte: bool
    #: The model it waits on (one stalled on the neuron fails it over); None: none.
    model: str | None = None
    #: Why it was cut short; None: it was not.
    cut: CortexError | None = None
    #: Whether the request may move to the next route after the cut.
    retry: bool = False


class _Retry(Exception):
    def __init__(self, error: CortexError, *, exclude: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.exclude = exclude


class _ConnectTimeout(hop.HopError):
    """No connection within ``connect_timeout`` (a TooSlowError would read as no first byte)."""


def _hop_error(neuron: NeuronState, exc: hop.HopError) -> CortexError:
    if isinstance(exc, _ConnectTimeout):
        return UpstreamTimeout(f"neuron {neuron.name} did not answer in time")
    return NeuronUnreachable(f"neuron {neuron.name} unreachable: {exc}")


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI, Responses or Anthropic usage.

    Anthropic's ``input_tokens`` leaves out the cached part: it is added back.
    """
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    for cached in ("cache_read_input_tokens", "cache_creation_input_tokens"):
        if isinstance(usage.get(cached), int):
            prompt += usage[cached]
    return prompt, completion


def cached_tokens(usage: dict[str, Any] | None) -> int:
    """Prompt tokens the neuron reused from its prompt cache, per an OpenAI,
    Responses or Anthropic usage (0 when it does not say)."""
    if not usage:
        return 0
    found = usage.get("cache_read_input_tokens")
    for details in ("prompt_tokens_details", "input_tokens_details"):
        if found is None and isinstance(usage.get(details), dict):
            found = usage[details].get("cached_tokens")
    return found if isinstance(found, int) and found > 0 else 0


@attrs.define(eq=False)
class Proxy:
    router: Router
    section: GatewaySection
    metrics: GatewayMetrics
    #: Keep-alive connections, one pool per neuron endpoint.
    pools: dict[str, hop.Pool] = attrs.field(factory=dict, init=False)
    #: The waits for a first byte, per neuron: failed over if it goes down.
    first_byte: dict[NeuronState, set[_Wait]] = attrs.field(factory=dict, init=False)
    #: Every wait under way, first bytes and streams' next chunks.
    waits: set[_Wait] = attrs.field(factory=set, init=False)
    #: Set once the gateway has cut every wait at shutdown: new ones end at once.
    stopped: CortexError | None = attrs.field(default=None, init=False)

    def pool(self, base_url: str) -> hop.Pool:
        pool = self.pools.get(base_url)
        if pool is None:
            pool = self.pools[base_url] = hop.Pool(partial(self._connect, base_url))
        return pool

    async def _connect(self, base_url: str) -> trio.abc.Stream:
        url = urlsplit(base_url)
        host = url.hostname or "127.0.0.1"
        tls = url.scheme == "https"
        with trio.move_on_after(self.section.connect_timeout):
            if tls:
                return await trio.open_ssl_over_tcp_stream(
                    host, url.port or 443, https_compatible=True
                )
            return await trio.open_tcp_stream(host, url.port or 80)
        raise _ConnectTimeout(f"no connection within {self.section.connect_timeout:g} s")

    def close(self) -> None:
        """Close the idle connections to every neuron."""
        for pool in self.pools.values():
            pool.close()

    # -- cutting waits short --------------------------------------------------

    def _begin_wait(
        self, neuron: NeuronState, timeout: float, *, first_byte: bool, model: str | None = None
    ) -> _Wait:
        """A wait on ``neuron`` of at most ``timeout`` seconds, open to ``cut``.

        The caller enters its scope, and calls ``_end_wait`` in a
        ``finally``; after the scope, ``scope.cancelled_caught`` says
        whether the wait ended early: cut short when ``cut`` is set, else
        timed out. (Not a context manager: it runs for every chunk.)
        """
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        wait = _Wait(neuron, scope, first_byte, model)
        self.waits.add(wait)
        if first_byte:
            self.first_byte.setdefault(neuron, set()).add(wait)
            self._fail_over(wait)
        if self.stopped is not None:
            self.cut(wait, self.stopped)
        return wait

    def _end_wait(self, wait: _Wait) -> None:
        self.waits.discard(wait)
        if wait.first_byte:
            waits = self.first_byte[wait.neuron]
            waits.discard(wait)
            if not waits:
                del self.first_byte[wait.neuron]

    @staticmethod
    def cut(wait: _Wait, error: CortexError, *, retry: bool = False) -> None:
        """End ``wait`` now: it raises ``error`` (or moves on, ``retry``)."""
        if wait.cut is None:
            wait.cut, wait.retry = error, retry
            wait.scope.cancel()

    def _fail_over(self, wait: _Wait) -> None:
        """Cut a first-byte ``wait`` short if its neuron is down or its model stalled there."""
        if not wait.neuron.up:
            self._cut_down(wait)
        elif wait.model in wait.neuron.stalled:
            self._cut_stalled(wait)

    def _cut_down(self, wait: _Wait) -> None:
        neuron = wait.neuron
        error = NeuronUnreachable(
            f"neuron {neuron.name} went down before it answered: {neuron.last_error}"
        )
        self.cut(wait, error, retry=True)

    def _cut_stalled(self, wait: _Wait) -> None:
        neuron, model = wait.neuron, wait.model
        status = neuron.models.get(model or "")
        stalled = f" for {status.stalled_secs:.0f} s" if status is not None else ""
        error = UpstreamTimeout(
            f"model {model} on neuron {neuron.name} made no progress{stalled} "
            f"(stall_timeout {self.section.stall_timeout:g} s)"
        )
        self.cut(wait, error, retry=True)

    def neurons_down(self) -> None:
        """Fail over the requests waiting for the first byte of a neuron that is
        down, or of a model stalled on its neuron.

        Nothing has been sent to their clients yet: like a request that
        could not connect, each moves to the next route. Streams under way
        keep their ``idle_timeout``.
        """
        for waits in self.first_byte.values():
            for wait in waits:
                self._fail_over(wait)

    async def watch_fleet(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``neurons_down`` after every change of the fleet, until cancelled.

        A poller that marks a neuron down changes the fleet
        (``FleetState.changed``).
        """
        state = self.router.state
        task_status.started()
        while True:
            await state.wait_changed()
            self.neurons_down()

    def stop(self, error: CortexError) -> None:
        """Cut every wait under way, and any that starts later, with ``error``.

        The gateway's shutdown, after ``grace_period``: each request still
        waiting for its first byte is answered with ``error``, each stream
        still running ends with it as the dialect's error event.
        """
        self.stopped = error
        for wait in list(self.waits):
            self.cut(wait, error)

    async def stop_after(self, shutdown: trio.Event, grace_period: float) -> None:
        """``stop`` the requests still running ``grace_period`` seconds after ``shutdown``."""
        await shutdown.wait()
        await trio.sleep(grace_period)
        log.warning(
            "shutting down: cutting %d request(s) still running after %g s",
            len(self.waits),
            grace_period,
        )
        self.stop(
            Unavailable(
                f"the gateway shut down: the request ran past its {grace_period:g} s grace period"
            )
        )

    # -- before the first byte ------------------------------------------------

    async def dispatch(self, ex: Exchange, path: str, content: bytes) -> None:
        """Route ``ex`` and send it until a neuron answers its first byte.

        On return ``ex.neuron``, ``ex.response`` and ``ex.first`` are set
        and the route is held: one of the relays (or ``finish``) releases it.

        Raises:
          CortexError: for the client, in its dialect: no route (404, 503),
            the neuron's own error answer, or the last failure when every
            route failed.
        """
        assert ex.model is not None
        exclude: set[str] = set()
        last_error: CortexError | None = None
        for _ in range(len(self.router.state.neurons) + 2):
            try:
                neuron = await self.router.acquire(
                    ex.model, exclude=exclude, prompt=ex.prompt, asked=ex.asked
                )
            except (ModelNotFound, Unavailable) as exc:
                # The router's answer (503 with Retry-After, or 404) is the
                # client's, as for any request with no route; a failed try
                # (a neuron that died since the last poll) only explains it.
                if last_error is not None:
                    exc.message = f"{exc.message} (tried: {last_error.message})"
                raise
            ex.tried = neuron
            try:
                await self._attempt(ex, neuron, path, content)
                self.router.answering(neuron, ex.model, ex.prompt)
                return
            except _Retry as retry:
                self.router.release(neuron, ex.model, prompt=ex.prompt)
                last_error = retry.error
                if retry.exclude:
                    exclude.add(neuron.name)
                log.warning(
                    "request %s to %s failed before its first byte, trying the next route: %s",
                    ex.request_id,
                    neuron.name,
                    retry.error.message,
                )
            except BaseException:
                self.router.release(neuron, ex.model, prompt=ex.prompt)
                raise
        assert last_error is not None
        raise last_error

    @staticmethod
    def _request(neuron: NeuronState, path: str, content: bytes, request_id: str) -> bytes:
        url = urlsplit(neuron.base_url)
        headers = [
            ("host", url.netloc),
            ("content-type", "application/json"),
            ("accept-encoding", "identity"),
            ("x-request-id", request_id),
        ]
        if neuron.token:
            headers.append(("authorization", f"Bearer {neuron.token}"))
        return hop.encode_request("POST", url.path + path, headers, content)

    async def _attempt(self, ex: Exchange, neuron: NeuronState, path: str, content: bytes) -> None:
        request = self._request(neuron, path, content, ex.request_id)
        assert ex.model is not None
        timeout = self.section.first_byte_timeout
        wait = self._begin_wait(neuron, timeout, first_byte=True, model=ex.model)
        try:
            with wait.scope:
                response = await self.pool(neuron.base_url).send(request)
                try:
                    if response.status >= 400:
                        body = await response.read()
                        error = error_from_response(response.status, body, response.headers)
                        if response.status == 404:
                            # Unloaded since the last poll: route again.
                            self.router.forget(neuron, ex.model)
                            raise _Retry(error, exclude=False)
                        if response.status in (502, 503):
                            raise _Retry(error, exclude=True)
                        raise error
                    if ex.stream:
                        first = await anext(response, b"")
                    else:
                        first = await response.read()
                except BaseException:
                    response.close()
                    raise
        except hop.HopError as exc:
            neuron.mark_suspect(f"{type(exc).__name__}: {exc}")
            raise _Retry(_hop_error(neuron, exc), exclude=True)
        finally:
            self._end_wait(wait)
        if wait.scope.cancelled_caught:
            if wait.cut is None:
                raise UpstreamTimeout(f"neuron {neuron.name} sent nothing within {timeout:g} s")
            if wait.retry:
                raise _Retry(wait.cut, exclude=True)
            raise wait.cut
        # A cut that came too late to interrupt anything: the answer is in.
        ex.neuron, ex.response, ex.first = neuron, response, first
        ex.first_at = trio.current_time()

    async def post(self, neuron: NeuronState, path: str, content: bytes, request_id: str) -> bytes:
        """POST ``content`` to ``neuron`` and read its whole answer, with no route held.

        For a small call beside a request (counting its prompt), on the
        same keep-alive connections as the requests.

        Raises:
          CortexError: the neuron's error answer; UpstreamTimeout or
            NeuronUnreachable when it did not answer.
        """
        request = self._request(neuron, path, content, request_id)
        timeout = self.section.first_byte_timeout
        wait = self._begin_wait(neuron, timeout, first_byte=True)
        try:
            with wait.scope:
                response = await self.pool(neuron.base_url).send(request)
                try:
                    body = await response.read()
                finally:
                    response.close()
        except hop.HopError as exc:
            raise _hop_error(neuron, exc)
        finally:
            self._end_wait(wait)
        if wait.scope.cancelled_caught:
            if wait.cut is None:
                raise UpstreamTimeout(f"neuron {neuron.name} sent nothing within {timeout:g} s")
            raise wait.cut
        if response.status >= 400:
            raise error_from_response(response.status, body, response.headers)
        return body

    # -- after the first byte -------------------------------------------------

    async def next_chunk(self, ex: Exchange) -> bytes | None:
        """The next chunk of the stream, None at its end.

        Raises:
          UpstreamTimeout: nothing for ``idle_timeout`` seconds.
          UpstreamError: the neuron dropped the connection.
          Unavailable: the gateway shut down (``stop``).
        """
        assert ex.response is not None and ex.neuron is not None
        timeout = self.section.idle_timeout
        wait = self._begin_wait(ex.neuron, timeout, first_byte=False)
        try:
            with wait.scope:
                return await anext(ex.response, None)
        except hop.HopError as exc:
            raise UpstreamError(f"neuron {ex.neuron.name} failed mid-stream: {exc}")
        finally:
            self._end_wait(wait)
        if wait.cut is not None:
            raise wait.cut
        raise UpstreamTimeout(f"neuron {ex.neuron.name} sent nothing for {timeout:g} s")

    def finish(self, ex: Exchange) -> None:
        """Close the neuron's response, release the route and record the exchange (once).

        Records ``ex.status``, ``ex.usage`` and ``ex.follows``. Whoever takes an exchange
        from ``dispatch`` calls this in a ``finally``; calls after the first
        only close the response.
        """
        if ex.response is not None:
            ex.response.close()
        if ex.finished:
            return
        ex.finished = True
        end = trio.current_time()
        model = ex.model or "unknown"
        tried = ex.neuron or ex.tried
        neuron = tried.name if tried is not None else ""
        status = ex.status
        counts = token_counts(ex.usage)
        # A stream's first chunk marks its first token and the start of
        # decoding; a whole body says neither, only how many tokens it holds.
        first_token_s = decode_s = None
        if ex.stream and ex.first_at is not None:
            first_token_s = ex.first_at - ex.started
            decode_s = end - ex.first_at
        if ex.neuron is not None and ex.model is not None:
            self.router.release(
                ex.neuron,
                ex.model,
                first_token_s=first_token_s,
                completion_tokens=counts[1] if counts is not None else None,
                decode_s=decode_s if counts is not None else None,
                prompt=ex.prompt,
                follows=ex.follows and status < 400,
            )
        log.info(
            "%s %d model=%s neuron=%s %.3fs request_id=%s%s",
            ex.endpoint,
            status,
            model,
            neuron or "-",
            end - ex.started,
            ex.request_id,
            f" error={ex.error}" if ex.error else "",
        )
        m = self.metrics
        m.requests.labels(ex.endpoint, model, neuron).inc()
        if status >= 400:
            m.errors.labels(ex.endpoint, model, str(status)).inc()
        m.duration.labels(ex.endpoint, model).observe(end - ex.started)
        if first_token_s is not None:
            m.first_token.labels(ex.endpoint, model, neuron).observe(first_token_s)
        if counts is not None and neuron:
            prompt, completion = counts
            m.tokens.labels(model, neuron, "prompt").inc(prompt)
            m.tokens.labels(model, neuron, "completion").inc(completion)
            m.tokens.labels(model, neuron, "cached").inc(cached_tokens(ex.usage))
            # For a non-stream, generation time is all of it (prompt included).
            since = ex.first_at if ex.stream and ex.first_at is not None else ex.started
            if completion > 1 and end > since:
                m.tokens_per_second.labels(model, neuron).observe(completion / (end - since))
