"""Gateway overhead: the same load sent to a backend directly and through a gateway.

Starts a fast fake OpenAI backend (a raw asyncio HTTP/1.1 server answering
/v1/chat/completions with canned bodies and streams, plus the neuron
endpoints the gateway polls) in its own process, a gateway in front of it
in another (``python -m cortex --role gateway``), then measures both paths,
non-streaming and streaming:

(a) one client in sequence (``--requests``, keep-alive, a raw socket
    client): the latency the gateway adds, p50/p99, and for streams the time
    to the first body byte;
(b) ``--clients`` concurrent connections for ``--duration`` seconds (wrk
    when it is installed, else an asyncio client in its own process):
    requests/s at saturation.

``--anthropic`` adds the Anthropic route: ``/v1/messages`` through the same
gateway (translated to chat completions on the way in, back to Anthropic
JSON or events on the way out), its added latency measured against the
backend's chat completions called directly.

``--asgi`` adds a second backend: a bare ASGI app on hypercorn (trio) with
the same answers, measured directly and through a second gateway in front
of it. That pair is the like-for-like comparison with ../shared/FINDINGS.md
(a naive quart-trio proxy reached 33% of a trivial quart-trio route), the
raw asyncio backend being several times faster than any Python ASGI server.

Everything runs ``--rounds`` times (the machine is shared: read the load
average printed with each round). The ``cpu`` columns are the gateway
process's CPU milliseconds per request, steadier than latency on a busy
machine. ``--cortex DIR`` runs the gateway from another copy of the package
(a before/after comparison).

Targets on a 2-core machine: at one client, p50 added latency under 1 ms,
p99 under 3 ms, streaming first byte within 1 ms of direct; at 64 clients,
gateway throughput at least 40% of direct.

    .venv/bin/python contrib/bench/gateway.py [--requests 500] [--clients 64] [--duration 5]
        [--rounds 2] [--loadgen wrk|python] [--cortex DIR] [--anthropic] [--asgi]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MODEL = "bench"
WORDS = [
    "Hello",
    " from",
    " the",
    " bench",
    " backend",
    ",",
    " one",
    " token",
    " at",
    " a",
    " time",
]
CREATED = 1_700_000_000


# -- the backend ----------------------------------------------------------------


def _json_response(body: bytes, status: str = "200 OK") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def payloads() -> tuple[dict[str, bytes], list[bytes]]:
    """The bodies of the backend's JSON answers, and a stream's SSE events."""
    ids = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED}
    frames = []
    for n, word in enumerate(WORDS):
        delta = {"role": "assistant", "content": word} if n == 0 else {"content": word}
        frames.append({**ids, "model": MODEL, "choices": [{"index": 0, "delta": delta}]})
    frames.append(
        {**ids, "model": MODEL, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )
    usage = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)}
    frames.append({**ids, "model": MODEL, "choices": [], "usage": usage})
    sse = [f"data: {json.dumps(f)}\n\n".encode() for f in frames] + [b"data: [DONE]\n\n"]
    completion = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(WORDS)},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage,
    }
    model_status = {
        "id": MODEL,
        "harness": "fake",
        "status": "loaded",
        "devices": [],
        "memory_mb": 100,
        "loaded_at": time.time(),
        "last_used": None,
        "in_flight": 0,
        "queued": 0,
        "n_ctx": 4096,
        "error": None,
        # Slots the gateway's scheduler may fill at once: more than the clients,
        # so that the bench measures proxying, not the gateway's admission queue.
        "parallel": 256,
    }
    discovery = {
        "hostname": "bench",
        "os": "Linux",
        "kernel": "6.0",
        "cpu": {"model": "fake", "cores": 2},
        "ram_total_mb": 8000,
        "devices": [],
        "harnesses": [{"name": "fake", "version": "1", "formats": ["gguf"], "cuda": False}],
    }
    health = {
        "uptime_secs": 1.0,
        "devices": [],
        "memory": {"total_mb": 8000, "used_mb": 100, "free_mb": 7900},
        "activation": {"in_progress": [], "pending": [], "failed": []},
        "queue_depth": 0,
        "in_flight": 0,
    }
    bodies = {
        "completion": json.dumps(completion).encode(),
        "/discovery": json.dumps(discovery).encode(),
        "/health": json.dumps(health).encode(),
        "/models": json.dumps([model_status]).encode(),
        # The prompt count an Anthropic stream's message_start carries.
        "/tokenize": json.dumps({"count": 5}).encode(),
        "404": b'{"error": {"message": "not found"}}',
    }
    return bodies, sse


def canned() -> tuple[dict[str, bytes], list[bytes]]:
    """Every answer the raw backend gives, encoded once, and a stream's chunks."""
    bodies, sse = payloads()
    answers = {
        name: _json_response(body, "404 Not Found" if name == "404" else "200 OK")
        for name, body in bodies.items()
    }
    answers["stream_head"] = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    answers["stream_end"] = b"0\r\n\r\n"
    return answers, [_chunk(f) for f in sse]


class _BackendProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and just enough parsing for the bench's requests."""

    answers: dict[str, bytes] = {}
    frames: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            match = re.search(r"(?im)^content-length:\s*(\d+)", head)
            if match:
                length = int(match.group(1))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.answer(head.split(" ", 2)[1], body)

    def answer(self, path: str, body: bytes) -> None:
        if self.transport.is_closing():  # type: ignore[attr-defined]
            return  # wrk hangs up mid-request when its time is up
        write = self.transport.write  # type: ignore[attr-defined]
        if path.startswith("/v1/"):
            if b'"stream":true' in body.replace(b" ", b""):
                write(self.answers["stream_head"])
                # One write per event, as a generating backend would send them.
                for frame in self.frames:
                    write(frame)
                write(self.answers["stream_end"])
            else:
                write(self.answers["completion"])
        else:
            write(self.answers.get(path, self.answers["404"]))


def run_backend(port: int) -> None:
    # asyncio warns on every write to a connection wrk has already dropped.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    _BackendProtocol.answers, _BackendProtocol.frames = canned()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_BackendProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def asgi_backend() -> object:
    """The same answers as a bare ASGI app (no framework), for hypercorn."""
    bodies, sse = payloads()
    json_headers = [(b"content-type", b"application/json")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path.startswith("/v1/") and b'"stream":true' in body.replace(b" ", b""):
            await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
            for frame in sse:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        answer = bodies["completion"] if path.startswith("/v1/") else bodies.get(path)
        status = 200 if answer is not None else 404
        await send({"type": "http.response.start", "status": status, "headers": json_headers})
        await send({"type": "http.response.body", "body": answer or bodies["404"]})

    return app


def run_asgi_backend(port: int) -> None:
    import hypercorn.config
    import hypercorn.trio
    import trio

    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.backlog = 1024
    # Like the gateway's own server (cortex.serve): no keep-alive limit in the way.
    config.keep_alive_timeout = 75
    trio.run(hypercorn.trio.serve, asgi_backend(), config)


# -- a raw HTTP/1.1 client --------------------------------------------------------


class Connection:
    """One keep-alive connection; ``post`` times the first body byte and the end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connect()

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def post(self, request: bytes) -> tuple[float, float, bytes]:
        """(seconds to the first body byte, seconds to the end, the body)."""
        started = time.perf_counter()
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._read()
        head = self.buffer[:end].decode("latin-1").lower()
        self.buffer = self.buffer[end + 4 :]
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head.splitlines()[0]}")
        first = None
        body = bytearray()
        if "transfer-encoding: chunked" in head:
            while True:
                while (eol := self.buffer.find(b"\r\n")) < 0:
                    self._read()
                size = int(self.buffer[:eol].split(b";")[0], 16)
                while len(self.buffer) < eol + 2 + size + 2:
                    self._read()
                if size and first is None:
                    first = time.perf_counter()
                body += self.buffer[eol + 2 : eol + 2 + size]
                self.buffer = self.buffer[eol + 2 + size + 2 :]
                if size == 0:
                    break
        else:
            match = re.search(r"content-length:\s*(\d+)", head)
            assert match, head
            length = int(match.group(1))
            while not self.buffer:
                self._read()
            first = time.perf_counter()
            while len(self.buffer) < length:
                self._read()
            body += self.buffer[:length]
            self.buffer = self.buffer[length:]
        done = time.perf_counter()
        assert first is not None
        if "connection: close" in head:  # hypercorn's keep_alive_max_requests
            self.close()
            self.connect()
        return first - started, done - started, bytes(body)


#: API -> the path its requests go to.
TARGETS = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}


def request_bytes(port: int, body: bytes, api: str = "chat") -> bytes:
    return (
        f"POST {TARGETS[api]} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def body_for(stream: bool, api: str = "chat") -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
        if api == "chat":
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(port: int, stream: bool, count: int, api: str = "chat") -> dict[str, float]:
    """``count`` requests one after another on one connection (after a warm-up)."""
    conn = Connection(port)
    request = request_bytes(port, body_for(stream, api), api)
    try:
        for _ in range(min(50, count)):
            conn.post(request)
        firsts, totals = [], []
        for _ in range(count):
            first, total, _body = conn.post(request)
            firsts.append(first)
            totals.append(total)
    finally:
        conn.close()
    return {
        "p50": quantile(totals, 0.5) * 1000,
        "p99": quantile(totals, 0.99) * 1000,
        "first50": quantile(firsts, 0.5) * 1000,
        "first99": quantile(firsts, 0.99) * 1000,
    }


# -- load at saturation -------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = {body}
"""


def _wrk_ms(value: str) -> float:
    """wrk's latency text (``812.00us``, ``1.20ms``, ``2.00s``) in ms."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    assert match, value
    number, unit = float(match.group(1)), match.group(2)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def saturate_wrk(
    port: int, stream: bool, clients: int, duration: float, api: str = "chat"
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.format(body=json.dumps(body_for(stream, api).decode())))
    try:
        command = [
            *("wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--latency"),
            *("-s", script.name, f"http://127.0.0.1:{port}{TARGETS[api]}"),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise SystemExit(f"errors under load:\n{out}")
    found = {
        key: re.search(pattern, out)
        for key, pattern in (
            ("rps", r"Requests/sec:\s*([\d.]+)"),
            ("p50", r"\s50%\s+(\S+)"),
            ("p99", r"\s99%\s+(\S+)"),
        )
    }
    if not all(found.values()):
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return {
        "rps": float(found["rps"].group(1)),  # type: ignore[union-attr]
        "p50": _wrk_ms(found["p50"].group(1)),  # type: ignore[union-attr]
        "p99": _wrk_ms(found["p99"].group(1)),  # type: ignore[union-attr]
    }


async def _async_load(
    port: int, stream: bool, clients: int, duration: float, api: str = "chat"
) -> list[float]:
    request = request_bytes(port, body_for(stream, api), api)
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                if b"transfer-encoding: chunked" in head:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    match = re.search(rb"content-length:\s*(\d+)", head)
                    assert match, head
                    await reader.readexactly(int(match.group(1)))
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies


def saturate_python(
    port: int, stream: bool, clients: int, duration: float, api: str = "chat"
) -> dict[str, float]:
    # In a process of its own, like wrk, so that it does not share our interpreter.
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); import gateway as g; "
        "print(json.dumps(asyncio.run(g._async_load(*map(json.loads, sys.argv[2:])))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    args = [str(port), json.dumps(stream), str(clients), str(duration), json.dumps(api)]
    out = subprocess.run(
        [sys.executable, "-c", code, here, *args], capture_output=True, text=True, check=True
    ).stdout
    latencies = json.loads(out)
    return {
        "rps": len(latencies) / duration,
        "p50": quantile(latencies, 0.5) * 1000,
        "p99": quantile(latencies, 0.99) * 1000,
    }


# -- processes ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, needle: bytes, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
                data = b""
                # The backend ignores "connection: close": read until the answer shows.
                while needle not in data and (chunk := s.recv(65536)):
                    data += chunk
                if needle in data:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"127.0.0.1:{port}{path} not ready in {timeout:g} s")
        time.sleep(0.1)


def measure(
    paths: list[tuple[str, int, int, str]], args: argparse.Namespace
) -> list[tuple[str, dict[str, dict[str, float]], dict[str, dict[str, float]]]]:
    """One round: both kinds, every path, in sequence and at saturation.

    ``paths``: (label, port, pid of the gateway that path belongs to, API).
    Each result also carries ``cpu``: that gateway process's CPU
    milliseconds per request while the load ran (about zero on a direct path).
    """
    saturate = saturate_wrk if args.loadgen == "wrk" else saturate_python
    rows = []
    for stream in (False, True):
        seq, sat = {}, {}
        for path, port, pid, api in paths:
            cpu = cpu_seconds(pid)
            seq[path] = sequential(port, stream, args.requests, api)
            spent = cpu_seconds(pid) - cpu
            seq[path]["cpu"] = spent / (args.requests + min(50, args.requests)) * 1000
        for path, port, pid, api in paths:
            cpu = cpu_seconds(pid)
            sat[path] = saturate(port, stream, args.clients, args.duration, api)
            spent = cpu_seconds(pid) - cpu
            sat[path]["cpu"] = spent / max(1.0, sat[path]["rps"] * args.duration) * 1000
        rows.append(("stream" if stream else "json", seq, sat))
    return rows


def start_gateway(backend_port: int, cortex: str | None) -> tuple[subprocess.Popen, int]:
    gateway_port, metrics_port = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "cortex", "--role", "gateway"),
        *("--neuron", f"b=http://127.0.0.1:{backend_port}"),
        *("--listen", f"127.0.0.1:{gateway_port}"),
        *("--metrics-listen", f"127.0.0.1:{metrics_port}"),
        *("--log-level", "warning"),
    ]
    env = dict(os.environ)
    if cortex:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cortex, env.get("PYTHONPATH")]))
    # ``python -m`` puts the working directory first on sys.path: run there too,
    # or the checkout the bench was started from wins over ``cortex``.
    return subprocess.Popen(command, env=env, cwd=cortex or None), gateway_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per case")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per saturation run")
    parser.add_argument("--rounds", type=int, default=2, help="times to measure everything")
    parser.add_argument("--loadgen", choices=("wrk", "python"), default=None)
    parser.add_argument(
        "--cortex", metavar="DIR", help="run the gateway from the cortex package under DIR"
    )
    parser.add_argument(
        "--anthropic",
        action="store_true",
        help="also measure the Anthropic route (/v1/messages) through the gateway",
    )
    parser.add_argument(
        "--asgi",
        action="store_true",
        help="also measure a bare ASGI backend on hypercorn, directly and through a gateway",
    )
    parser.add_argument("--backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--asgi-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return
    if args.asgi_backend:
        run_asgi_backend(args.asgi_backend)
        return
    args.loadgen = args.loadgen or ("wrk" if shutil.which("wrk") else "python")

    backends = [("direct", "--backend")] + ([("asgi", "--asgi-backend")] if args.asgi else [])
    processes: list[subprocess.Popen] = []
    paths: list[tuple[str, int, int, str]] = []
    try:
        for label, flag in backends:
            backend_port = free_port()
            here = os.path.abspath(__file__)
            processes.append(subprocess.Popen([sys.executable, here, flag, str(backend_port)]))
            wait_ready(backend_port, "/health", b"uptime_secs")
            gateway, gateway_port = start_gateway(backend_port, args.cortex)
            processes.append(gateway)
            wait_ready(gateway_port, "/v1/models", b'"loaded": true')
            paths.append((label, backend_port, gateway.pid, "chat"))
            paths.append(
                ("gateway" if label == "direct" else "gw>asgi", gateway_port, gateway.pid, "chat")
            )
            if label == "direct" and args.anthropic:
                paths.append(("gw-msgs", gateway_port, gateway.pid, "messages"))
        print(f"gateway from {args.cortex or 'this checkout'}")
        print(
            f"one client: {args.requests} requests in sequence; {args.clients} clients "
            f"for {args.duration:g} s ({args.loadgen}); {os.cpu_count()} cores"
        )
        for round in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            rows = measure(paths, args)
            print(
                f"\nround {round}, load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
            )
            report(rows, args.clients)
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)


def report(rows: list, clients: int) -> None:
    """The table, then the targets met or missed.

    Rows: ``direct`` the raw asyncio backend, ``gateway`` a gateway in front
    of it; with ``--anthropic``, ``gw-msgs`` that gateway's ``/v1/messages``
    (against the same direct chat completions); with ``--asgi``, ``asgi``
    the hypercorn ASGI backend and ``gw>asgi`` a gateway in front of that.
    """
    print(
        f"{'':<7}{'path':<8}| 1 client: {'p50':>6}{'p99':>7}{'first':>7}{'first99':>8}{'cpu':>6}"
        f" | {clients} clients: {'req/s':>6}{'p50':>7}{'p99':>7}{'cpu':>6}"
    )
    for kind, seq, sat in rows:
        for path in seq:
            s, t = seq[path], sat[path]
            print(
                f"{kind:<7}{path:<8}|{'':>10}{s['p50']:>6.2f}{s['p99']:>7.2f}{s['first50']:>7.2f}"
                f"{s['first99']:>8.2f}{s['cpu']:>6.2f} |{'':>13}{t['rps']:>6.0f}{t['p50']:>7.1f}"
                f"{t['p99']:>7.1f}{t['cpu']:>6.2f}"
            )
    print("(ms; first: to the first body byte; cpu: gateway CPU ms per request)")
    for kind, seq, sat in rows:
        d, g = seq["direct"], seq["gateway"]
        added50, added99 = g["p50"] - d["p50"], g["p99"] - d["p99"]
        first = g["first50"] - d["first50"]
        ratio = sat["gateway"]["rps"] / sat["direct"]["rps"]
        verdict = [
            f"added p50 {added50:+.2f} ms ({'ok' if added50 < 1 else 'MISS'} <1)",
            f"p99 {added99:+.2f} ({'ok' if added99 < 3 else 'MISS'} <3)",
        ]
        if kind == "stream":
            verdict.append(f"first byte {first:+.2f} ({'ok' if first <= 1 else 'MISS'} <=1)")
        verdict.append(
            f"throughput {ratio:.1%} of direct ({'ok' if ratio >= 0.4 else 'MISS'} >=40%)"
        )
        if "asgi" in sat:
            asgi = sat["gw>asgi"]["rps"] / sat["asgi"]["rps"]
            verdict.append(f"{asgi:.1%} of the ASGI backend (a naive proxy: 33%)")
        print(f"{kind:<7}" + "; ".join(verdict))
        if "gw-msgs" in seq:
            m = seq["gw-msgs"]
            added = m["p50"] - d["p50"]
            share = sat["gw-msgs"]["rps"] / sat["direct"]["rps"]
            print(
                f"{kind:<7}anthropic: added p50 {added:+.2f} ms, p99 {m['p99'] - d['p99']:+.2f}, "
                f"first byte {m['first50'] - d['first50']:+.2f}; throughput {share:.1%} of direct"
            )


if __name__ == "__main__":
    main()
