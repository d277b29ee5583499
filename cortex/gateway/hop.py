"""A small HTTP/1.1 client for the proxy hop (gateway -> neuron), on trio streams.

The gateway proxies every inference request to a neuron, and httpx with
httpcore cost about half of the gateway's CPU per request doing it (its
pool also polls every idle connection on each request). This client does
only what the hop needs:

- one :class:`Pool` per neuron: a stack of idle keep-alive connections,
  most recently used on top (O(1) to take and to give back, and the top is
  the connection least likely to have been closed by the neuron while idle);
- one write per request: :func:`encode_request` puts the request line,
  headers and body in one buffer;
- a minimal response parser: status line, headers (bounded in size),
  Content-Length, chunked or read-until-close bodies, ``connection: close``;
- :class:`Response` iterates the body as it arrives: the payload bytes (a
  chunked body's chunk data, not its framing), everything a read brought in
  one piece.

Timeouts are the caller's cancel scopes: around the connect (inside the
``connect`` function the pool is given), the response head, each chunk.
A cancelled or failed exchange closes its connection, as does closing a
response before its body was read to the end: only a connection whose
previous response was read completely goes back to the pool.

A reused connection the neuron closed while it sat idle shows up at reuse:
either it polls readable (end of file) when taken, or the write or the
read fails before any byte of a response; the request was then never
processed, and it is sent once more on a fresh connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio

#: Bound on a response's status line and headers (and on a chunk-size line).
MAX_HEAD = 64 * 1024
#: Bytes asked for per read.
READ_SIZE = 64 * 1024
#: Idle connections kept per pool; more are closed when given back.
MAX_IDLE = 256

#: Opens a new connection to the pool's server (the caller bounds it in time).
Connect = Callable[[], Awaitable[trio.abc.Stream]]

# Body framings, and the state of a chunked body.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = "length", "chunked", "until-close"
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HopError(Exception):
    """The exchange failed: no connection, a broken one, or a response that is not HTTP/1.1."""


class _Unanswered(HopError):
    """The connection failed before any byte of the response arrived."""


def encode_request(
    method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
) -> bytes:
    """The request line, ``headers``, a content-length and ``body``, in one buffer.

    Raises:
      ValueError: a header holds a line break (it would split the request).
    """
    headers = list(headers)
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers)
    # Each field ends in the one CR LF of its own: any other is an injection.
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
        raise ValueError("line break in a request header")
    head = f"{method} {target} HTTP/1.1\r\n{fields}content-length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


class Pool:
    """Idle keep-alive connections to one server.

    Args:
      connect: opens a new connection; it bounds the connect in time, and
        what it raises (other than ``OSError``) comes out of :meth:`send`.
      max_idle: idle connections kept.
    """

    def __init__(self, connect: Connect, max_idle: int = MAX_IDLE) -> None:
        self.connect = connect
        self.max_idle = max_idle
        self.idle: list[_Connection] = []

    async def send(self, request: bytes) -> Response:
        """Send ``request`` (from :func:`encode_request`); the response once its head is in.

        Raises:
          HopError: the connection could not be made or failed, or the
            response was not HTTP/1.1.
        """
        while self.idle:
            conn = self.idle.pop()
            if conn.readable():
                # Nothing is due on an idle connection: this is the neuron
                # closing it (or junk). Drop it, try the next one.
                conn.close()
                continue
            try:
                return await conn.exchange(request)
            except _Unanswered:
                break  # closed as we sent: the request was not processed, resend
        try:
            stream = await self.connect()
        except OSError as exc:
            raise HopError(f"cannot connect: {exc}") from exc
        return await _Connection(self, stream).exchange(request)

    def give_back(self, conn: _Connection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the idle connections (those in use close when their responses do)."""
        while self.idle:
            self.idle.pop().close()


class _Connection:
    def __init__(self, pool: Pool, stream: trio.abc.Stream) -> None:
        self.pool = pool
        self.stream = stream
        self.buffer = bytearray()
        self.used = False
        # The socket under the stream (a TLS stream's too), for the idle check.
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None
        )
        self.socket: trio.socket.SocketType | None = sock

    def readable(self) -> bool:
        """Whether the idle connection has something to read: end of file, or junk."""
        return bool(self.buffer) or (self.socket is not None and self.socket.is_readable())

    def close(self) -> None:
        # Closing the socket itself is synchronous, so it is safe while
        # cancelled and never blocks; a TLS stream skips its close_notify.
        if self.socket is not None:
            self.socket.close()
        else:
            trio.lowlevel.spawn_system_task(trio.aclose_forcefully, self.stream)

    async def fill(self) -> None:
        """Read more into the buffer.

        Raises:
          HopError: the connection broke, or the server closed it.
        """
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HopError(f"connection broken: {exc}") from exc
        if not data:
            raise HopError("connection closed by the server")
        self.buffer += data

    async def exchange(self, request: bytes) -> Response:
        reused, self.used = self.used, True
        try:
            try:
                await self.stream.send_all(request)
                await self.fill()
            except (HopError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # Not a byte back: on a reused connection, the server closed it while idle.
                raise (_Unanswered if reused else HopError)(f"no response: {exc}") from exc
            return await self.read_head()
        except BaseException:
            self.close()
            raise

    async def read_head(self) -> Response:
        while True:
            start = 0
            while (end := self.buffer.find(b"\r\n\r\n", start)) < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise HopError(f"response head over {MAX_HEAD} bytes")
                start = max(0, len(self.buffer) - 3)
                await self.fill()
            if end > MAX_HEAD:
                raise HopError(f"response head over {MAX_HEAD} bytes")
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            version, status, headers = _parse_head(head)
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            if not 100 <= status < 200:
                return Response(self, version, status, headers)


def _parse_head(head: str) -> tuple[str, int, dict[str, str]]:
    """(HTTP version, status, headers with lower-case names) of a response head."""
    status_line, *lines = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not _digits(code) or rest[3:4] not in ("", " "):
        raise HopError(f"not an HTTP/1.1 response: {status_line[:100]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name[0] in " \t":
            raise HopError(f"malformed response header: {line[:100]!r}")
        name = name.lower()
        value = value.strip()
        # Repeated fields are one comma-separated list (RFC 9110 5.3).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return version, int(code), headers


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


class Response:
    """A response whose head has arrived; iterate it for the body as it comes.

    The connection goes back to its pool once the body has been read to
    the end (and the server keeps it open); :meth:`close` before that
    closes it.
    """

    def __init__(self, conn: _Connection, version: str, status: int, headers: dict[str, str]):
        self.status = status
        self.headers = headers
        self._conn: _Connection | None = conn
        tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        self._keep_alive = version == "HTTP/1.1" and "close" not in tokens
        self._left = 0  # bytes to come of the body (length) or of the current chunk
        self._state = _DATA
        if status in (204, 304):
            self._framing = _LENGTH
        elif "transfer-encoding" in headers:
            # Only chunked is sent to us; anything else ends with the connection.
            chunked = headers["transfer-encoding"].lower().rsplit(",", 1)[-1].strip() == "chunked"
            self._framing = _CHUNKED if chunked else _UNTIL_CLOSE
            self._state = _SIZE if chunked else _DATA
        elif "content-length" in headers:
            length = headers["content-length"]
            if not _digits(length):
                raise HopError(f"bad content-length {length[:100]!r}")
            self._framing, self._left = _LENGTH, int(length)
        else:
            self._framing = _UNTIL_CLOSE
        if self._framing == _UNTIL_CLOSE:
            self._keep_alive = False
        elif self._framing == _LENGTH and not self._left:
            self._state = _DONE
            self._release()

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """The body bytes that have arrived, waiting for some if none have.

        Raises:
          StopAsyncIteration: the body is complete.
          HopError: the connection broke or the body's framing is wrong.
        """
        conn = self._conn
        if conn is None:
            if self._state == _DONE:
                raise StopAsyncIteration
            raise HopError("response closed before the end of its body")
        try:
            while True:
                data = self._decode(conn.buffer)
                if self._state == _DONE:
                    self._release()  # free for the next request before these last bytes go on
                if data:
                    return data
                if self._state == _DONE:
                    raise StopAsyncIteration
                try:
                    await conn.fill()
                except HopError as exc:
                    if self._framing != _UNTIL_CLOSE:
                        raise HopError(f"body cut short: {exc}") from exc
                    self._state = _DONE  # the end of such a body is the end of the connection
        except BaseException:
            self.close()  # a no-op once released
            raise

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        return b"".join([chunk async for chunk in self])

    def close(self) -> None:
        """Done with the response: an unfinished body closes the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        if self._keep_alive and not conn.buffer:
            conn.pool.give_back(conn)
        else:
            conn.close()  # closing, or data beyond the response: not reusable

    def _decode(self, buffer: bytearray) -> bytes:
        """Consume the body bytes in ``buffer``; their payload (chunk framing removed)."""
        if self._framing != _CHUNKED:
            if self._framing == _UNTIL_CLOSE or len(buffer) <= self._left:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[: self._left])
                del buffer[: self._left]
            if self._framing == _LENGTH:
                self._left -= len(data)
                if not self._left:
                    self._state = _DONE
            return data
        out: list[bytes | bytearray] = []
        pos = 0
        while self._state != _DONE:
            if self._state == _DATA:
                if pos == len(buffer):
                    break
                piece = buffer[pos : pos + self._left]
                out.append(piece)
                pos += len(piece)
                self._left -= len(piece)
                if not self._left:
                    self._state = _DATA_END
                continue
            # A line: a chunk's size, the end of its data, or a trailer field.
            eol = buffer.find(b"\n", pos)
            if eol < 0:
                if len(buffer) - pos > MAX_HEAD:
                    raise HopError("chunked framing line too long")
                break
            line = bytes(buffer[pos:eol]).rstrip(b"\r")
            pos = eol + 1
            if self._state == _SIZE:
                size = line.split(b";", 1)[0].strip()
                if not size or not set(size) <= _HEX:
                    raise HopError(f"bad chunk size {size[:100]!r}")
                self._left = int(size, 16)
                self._state = _DATA if self._left else _TRAILER
            elif self._state == _DATA_END:
                if line:
                    raise HopError("chunk data longer than its size")
                self._state = _SIZE
            elif not line:  # _TRAILER: fields until an empty line
                self._state = _DONE
        del buffer[:pos]
        return b"".join(out)
