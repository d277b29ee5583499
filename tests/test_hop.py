"""The proxy hop's HTTP/1.1 client against scripted servers.

Most tests run a trio TCP server on 127.0.0.1:0 whose handler plays one
side of the conversation; the parser's split-read tests feed a scripted
stream one piece per read, so that every boundary is a read boundary.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from cortex.gateway import hop

Handler = Callable[[trio.SocketStream, "Reader"], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
EVENTS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


def chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


class Server:
    """A TCP server whose ``handler`` runs once per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        #: Set when a connection's handler has seen the client close it.
        self.client_closed = trio.Event()
        self.port = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        await self.handler(stream, Reader(stream, self))


class Reader:
    """Reads requests off one server-side connection."""

    def __init__(self, stream: trio.SocketStream, server: Server) -> None:
        self.stream, self.server, self.buffer = stream, server, b""

    async def request(self) -> bytes | None:
        """The next request (head and body), None when the client closed."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._more():
                return None
        end = self.buffer.index(b"\r\n\r\n") + 4
        match = re.search(rb"(?i)content-length: (\d+)", self.buffer[:end])
        length = int(match.group(1)) if match else 0
        while len(self.buffer) < end + length:
            await self._more()
        request, self.buffer = self.buffer[: end + length], self.buffer[end + length :]
        self.server.requests.append(request)
        return request

    async def closed(self) -> None:
        """Return once the client has closed the connection."""
        while await self._more():
            pass

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.server.client_closed.set()
            return False
        self.buffer += data
        return True


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def pool_for(server: Server) -> hop.Pool:
    async def connect() -> trio.abc.Stream:
        with trio.fail_after(2):
            return await trio.open_tcp_stream("127.0.0.1", server.port)

    return hop.Pool(connect)


def post(body: bytes = b'{"model": "m"}') -> bytes:
    return hop.encode_request("POST", "/v1/chat/completions", [("host", "x")], body)


async def answer_each(response: bytes, stream: trio.SocketStream, reader: Reader) -> None:
    """Keep-alive: answer every request on the connection with ``response``."""
    while await reader.request() is not None:
        await stream.send_all(response)


# -- the request ------------------------------------------------------------------


def test_request_is_one_buffer_with_a_content_length() -> None:
    data = hop.encode_request(
        "POST", "/v1/x", [("host", "h:1"), ("x-request-id", "req_1")], b'{"a": 1}'
    )
    assert data == (
        b"POST /v1/x HTTP/1.1\r\nhost: h:1\r\nx-request-id: req_1\r\n"
        b'content-length: 8\r\n\r\n{"a": 1}'
    )


@pytest.mark.parametrize("value", ["a\r\nx-evil: 1", "a\nb", "a\rb"])
def test_line_breaks_in_headers_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        hop.encode_request("POST", "/", [("x-request-id", value)], b"")


# -- responses --------------------------------------------------------------------


async def test_content_length_response_and_keep_alive_reuse() -> None:
    async with serving(partial(answer_each, OK)) as server:
        pool = pool_for(server)
        for _ in range(3):
            response = await pool.send(post())
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
            assert await response.read() == b"{}"
            assert len(pool.idle) == 1
        assert server.connections == 1
        assert len(server.requests) == 3
        assert server.requests[0].endswith(b'content-length: 14\r\n\r\n{"model": "m"}')
        pool.close()


async def test_concurrent_requests_use_separate_connections() -> None:
    async with serving(partial(answer_each, OK)) as server:
        pool = pool_for(server)

        async def one() -> None:
            assert await (await pool.send(post())).read() == b"{}"

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert len(pool.idle) == server.connections
        for _ in range(8):
            await one()
        assert server.connections <= 4
        pool.close()


async def test_chunked_response_yields_payloads_as_they_arrive() -> None:
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        while await reader.request() is not None:
            await stream.send_all(CHUNKED_HEAD)
            for event in EVENTS:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
                await trio.sleep(0.02)
            await stream.send_all(b"0\r\n\r\n")

    async with serving(handler) as server:
        pool = pool_for(server)
        for _ in range(2):
            response = await pool.send(post())
            assert response.headers["transfer-encoding"] == "chunked"
            received = [chunk async for chunk in response]
            assert received == EVENTS  # one read per event, the framing removed
        assert server.connections == 1
        pool.close()


class Scripted(trio.abc.Stream):
    """A stream that answers each read with the next of ``pieces``."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.writes: list[bytes] = []
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def exchange_over(pieces: list[bytes]) -> tuple[hop.Response, bytes, Scripted, hop.Pool]:
    stream = Scripted(pieces)

    async def connect() -> trio.abc.Stream:
        return stream

    pool = hop.Pool(connect)
    response = await pool.send(post())
    body = await response.read()
    return response, body, stream, pool


SPLIT_CASES = {
    "content-length": (OK, b"{}"),
    "chunked": (
        CHUNKED_HEAD
        + b"b;ext=1\r\ndata: one\n\n\r\n"
        + chunked(b"data: two\n\n")[:-2]
        # a trailer field before the end
        + b"x-trailer: 1\r\n\r\n",
        b"data: one\n\ndata: two\n\n",
    ),
    "interim": (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"{}"),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
async def test_every_split_of_the_response_parses_the_same(case: str) -> None:
    wire, expected = SPLIT_CASES[case]
    splits = [[wire[:at], wire[at:]] for at in range(1, len(wire))]
    splits.append([wire[at : at + 1] for at in range(len(wire))])  # one byte per read
    for pieces in splits:
        response, body, stream, pool = await exchange_over(pieces)
        assert (response.status, body) == (200, expected), pieces
        assert pool.idle and not stream.closed  # read to its end: reusable
        assert len(stream.writes) == 1  # the request in one write


async def test_no_body_statuses_and_bodies_read_until_close() -> None:
    response, body, _, pool = await exchange_over([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert (response.status, body, len(pool.idle)) == (204, b"", 1)
    pieces = [b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it"]
    response, body, stream, pool = await exchange_over(pieces)
    assert (body, pool.idle) == (b"all of it", [])
    await trio.testing.wait_all_tasks_blocked()
    assert stream.closed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        # More than the response: the connection is out of step, not reusable.
        OK + b"HTTP/1.1 200 OK\r\n",
    ],
)
async def test_connections_that_cannot_be_reused_are_closed(head: bytes) -> None:
    _, body, stream, pool = await exchange_over([head])
    assert (body, pool.idle) == (b"{}", [])
    await trio.testing.wait_all_tasks_blocked()
    assert stream.closed


async def test_connection_close_over_tcp() -> None:
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        await reader.request()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
        )
        await reader.closed()

    async with serving(handler) as server:
        pool = pool_for(server)
        for _ in range(2):
            assert await (await pool.send(post())).read() == b"{}"
            assert pool.idle == []
        assert server.connections == 2
        with trio.fail_after(2):
            await server.client_closed.wait()


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n{}",
        CHUNKED_HEAD + b"zz\r\n",
        CHUNKED_HEAD + b"-1\r\n",
        CHUNKED_HEAD + b"2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"x-long: " + b"a" * hop.MAX_HEAD + b"\r\n\r\n",
    ],
)
async def test_malformed_responses_are_hop_errors(wire: bytes) -> None:
    with pytest.raises(hop.HopError):
        await exchange_over([wire])


# -- failures -----------------------------------------------------------------------


@pytest.mark.parametrize("wire", [OK[:-1], CHUNKED_HEAD + b"b\r\ndata: one\n\n\r\n5\r\nab"])
async def test_response_cut_mid_body(wire: bytes) -> None:
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        await reader.request()
        await stream.send_all(wire)  # and hang up

    async with serving(handler) as server:
        pool = pool_for(server)
        response = await pool.send(post())
        received = []
        with pytest.raises(hop.HopError, match="body cut short"):
            async for chunk in response:
                received.append(chunk)
        assert b"".join(received) in (b"{", b"data: one\n\nab")
        assert pool.idle == []


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        await reader.request()
        await stream.send_all(OK)
        # A keep-alive timeout: the server closes the idle connection.
        await stream.aclose()
        hung_up.set()

    hung_up = trio.Event()

    async with serving(handler) as server:
        pool = pool_for(server)
        assert await (await pool.send(post())).read() == b"{}"
        assert len(pool.idle) == 1
        with trio.fail_after(2):
            await hung_up.wait()
        assert pool.idle[0].readable()  # the FIN arrived: seen before anything is sent
        assert await (await pool.send(post())).read() == b"{}"
        assert server.connections == 2
        assert len(server.requests) == 2  # the request went out once


async def test_reused_connection_failing_before_the_answer_is_retried_once() -> None:
    # The server takes the second request on the first connection and hangs
    # up without a byte (closing as the request crossed it): sent again, on
    # a fresh connection. A fresh connection doing the same is an error.
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        if server.connections == 1:
            await reader.request()
            await stream.send_all(OK)
            await reader.request()
            await stream.aclose()
        else:
            await answer_each(OK, stream, reader)

    async with serving(handler) as server:
        pool = pool_for(server)
        assert await (await pool.send(post())).read() == b"{}"
        assert await (await pool.send(post())).read() == b"{}"
        assert (server.connections, len(server.requests)) == (2, 3)

    async def hang_up(stream: trio.SocketStream, reader: Reader) -> None:
        await reader.request()
        await stream.aclose()

    async with serving(hang_up) as server:
        with pytest.raises(hop.HopError, match="no response"):
            await pool_for(server).send(post())
        assert server.connections == 1


async def test_connect_failures() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connecting is refused

    async def refused() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    with pytest.raises(hop.HopError, match="cannot connect"):
        await hop.Pool(refused).send(post())

    class Mine(Exception):
        pass

    async def too_slow() -> trio.abc.Stream:
        raise Mine()  # what the caller's connect raises comes out as it is

    with pytest.raises(Mine):
        await hop.Pool(too_slow).send(post())


async def test_timeouts_are_the_callers_and_close_the_connection() -> None:
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        if await reader.request() is None:
            return
        if server.connections == 2:
            await stream.send_all(CHUNKED_HEAD + chunked(EVENTS[0])[:-5])  # then stall
        await reader.closed()

    async with serving(handler) as server:
        pool = pool_for(server)
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.1):  # the first byte
                await pool.send(post())
        assert pool.idle == []
        with trio.fail_after(2):
            await server.client_closed.wait()

        server.client_closed = trio.Event()
        response = await pool.send(post())
        assert await response.__anext__() == EVENTS[0]
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.1):  # between chunks
                await response.__anext__()
        assert pool.idle == []
        with trio.fail_after(2):
            await server.client_closed.wait()
        with pytest.raises(hop.HopError, match="closed before the end"):
            await response.__anext__()


async def test_closing_a_response_mid_body_closes_its_connection() -> None:
    # The client went away mid-stream (its cancel lands while the next chunk
    # is awaited), or the response is closed unread: the neuron sees its
    # connection close (and stops generating).
    async def handler(stream: trio.SocketStream, reader: Reader) -> None:
        await reader.request()
        await stream.send_all(CHUNKED_HEAD + chunked(*EVENTS)[:20])
        await reader.closed()

    async with serving(handler) as server:
        pool = pool_for(server)
        response = await pool.send(post())
        first = trio.Event()

        async def relay() -> None:
            async for _ in response:
                first.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            await first.wait()
            await trio.testing.wait_all_tasks_blocked()  # waiting for the next chunk
            nursery.cancel_scope.cancel()  # the client went away
        with trio.fail_after(2):
            await server.client_closed.wait()
        assert pool.idle == []

        # A response closed before its body was read.
        server.client_closed = trio.Event()
        response = await pool.send(post())
        response.close()
        with trio.fail_after(2):
            await server.client_closed.wait()
        assert pool.idle == []
