"""Concurrent streams: a batched neuron against llama-cpp-python's own server.

Starts each server as a separate process on a demo model (SmolLM2-135M-Instruct
Q4_1 by default, or Gemma 3 270M Q4_K_M), with the same threads and context, and runs 1, 2, 4 and 8
concurrent streaming clients against each, every client asking for
``--tokens`` greedy tokens after its own prompt (no two prompts share a
prefix, so no server answers from a cache). Reports, per server and
concurrency: aggregate tokens/s (all streams' tokens over the wall time of
the round), per-stream time to first token and inter-token latency (p50,
p99). Servers:

- ``cortex``: a neuron with continuous batching (``parallel`` = the highest
  concurrency);
- ``cortex-serial``: the same neuron with ``parallel = 1`` (the engine
  before batching: one request at a time, in turn);
- ``llama-cpp-python``: ``python -m llama_cpp.server`` with
  ``interrupt_requests`` off (it serves one request at a time);
- ``llama-server``: llama.cpp's own server with ``--parallel``, only when
  ``--llama-server BIN`` names one.

Targets (issue 6): cortex's aggregate at 8 streams >= 1.8x its 1-stream
rate and >= 0.95x llama-server's at every concurrency; cortex's 1-stream
speed >= 0.95x cortex-serial's; cortex's time to first token at 8 streams
under 4x its 1-stream value. ``--parallel 4 8 16`` runs the batched servers
once per slot count (cortex-p4, ...), to choose the default.

    .venv/bin/python contrib/bench/concurrency.py [--model smollm2|gemma3] [--threads 2]
        [--tokens 128] [--concurrency 1 2 4 8] [--rounds 2] [--parallel 4 8 16]
        [--servers cortex cortex-serial llama-cpp-python]
        [--llama-server /path/to/llama-server] [--json results.json]

llama-cpp-python's server needs its extras (without rebuilding llama.cpp):
``pip install sse-starlette starlette-context fastapi uvicorn pydantic-settings``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import httpx
import trio

TOPICS = [
    "the history of the printing press",
    "how bees find their way home",
    "the first railway across the Alps",
    "why the sky is blue at noon and red at dusk",
    "the life of a medieval stonemason",
    "the invention of the mechanical clock",
    "a voyage on a nineteenth-century whaling ship",
    "the chemistry of baking bread",
    "how glaciers carve valleys",
    "the design of Roman aqueducts",
    "the migration of Arctic terns",
    "the rise of the spice trade",
    "early experiments with electricity",
    "the architecture of Gothic cathedrals",
    "the discovery of penicillin",
    "how lighthouses were kept lit",
]


def prompt(round_: int, stream: int) -> str:
    # Distinct from the first token on: no server can reuse another's prefix.
    topic = TOPICS[(round_ * 7 + stream) % len(TOPICS)]
    return f"{round_ * 100 + stream}. An essay on {topic}. It begins in"


def demo_path(name: str) -> str:
    from cortex.neuron import sources

    return str(sources.resolve(sources.DEMO if name == "smollm2" else sources.DEMO_GEMMA))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    name: str, path: str, args: argparse.Namespace, parallel: int
) -> Iterator[tuple[str, str]]:
    """Start server ``name``; yield (base URL of its OpenAI API, model name)."""
    port = free_port()
    cleanup: list[str] = []
    if name in ("cortex", "cortex-serial"):
        parallel = parallel if name == "cortex" else 1
        options = {
            "n_threads": args.threads,
            "n_ctx": args.n_ctx,
            # As much KV as llama-server gets below: every stream its n_ctx.
            "kv_cells": args.n_ctx * parallel,
            "parallel": parallel,
        }
        chat_format = 'chat_format = "gemma"\n' if args.model == "gemma3" else ""
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
            config.write(
                f'[neuron]\nlisten = "127.0.0.1:{port}"\nqueue_limit = 256\n'
                f'[[models]]\nid = "demo"\nsource = "{path}"\n{chat_format}'
                "options = { " + ", ".join(f"{k} = {v}" for k, v in options.items()) + " }\n"
            )
        cleanup.append(config.name)
        command = [sys.executable, "-m", "cortex", "--role", "neuron", "--config", config.name]
        command += ["--log-level", "warning"]
    elif name == "llama-cpp-python":
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", path, "--model_alias", "demo",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--interrupt_requests", "False",
        ]  # fmt: skip
    elif name == "llama-server":
        if not args.llama_server:
            raise SystemExit("llama-server needs --llama-server BIN")
        command = [
            args.llama_server, "-m", path, "-a", "demo", "--host", "127.0.0.1",
            "--port", str(port), "-c", str(args.n_ctx * parallel), "-np", str(parallel),
            "-t", str(args.threads), "-tb", str(args.threads), "--log-disable",
        ]  # fmt: skip
    else:
        raise SystemExit(f"unknown server {name!r}")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read()[-2000:].decode(errors="replace")
                    raise SystemExit(f"{name} exited with {process.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if name.startswith("cortex"):
                        models = client.get("/models").json()
                        ready = bool(models) and models[0]["status"] == "loaded"
                    else:
                        ready = client.get("/v1/models").status_code == 200
                    if ready:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start in 120 s")
                time.sleep(0.2)
        yield base + "/v1", "demo"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        for name in cleanup:
            os.unlink(name)


@dataclass
class Stream:
    started: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_stream(client: httpx.AsyncClient, body: dict) -> Stream:
    stream = Stream(started=time.perf_counter())
    async with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage") and not chunk.get("choices"):
                stream.tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                stream.times.append(time.perf_counter())
    # Servers that send no usage: one chunk per token.
    stream.tokens = stream.tokens or len(stream.times)
    return stream


async def one_round(url: str, model: str, n: int, round_: int, tokens: int) -> list[Stream]:
    results: list[Stream] = []
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def run(i: int) -> None:
            body = {
                "model": model,
                "prompt": prompt(round_, i),
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            results.append(await one_stream(client, body))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(run, i)
    return results


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    low, high = math.floor(k), math.ceil(k)
    return values[low] + (values[high] - values[low]) * (k - low)


@dataclass
class Row:
    server: str
    concurrency: int
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tokens: int


def summarise(server_name: str, n: int, rounds: list[list[Stream]]) -> Row:
    rates, ttfts, gaps, total = [], [], [], 0
    for streams in rounds:
        begin = min(s.started for s in streams)
        end = max(s.times[-1] if s.times else s.started for s in streams)
        tokens = sum(s.tokens for s in streams)
        total += tokens
        rates.append(tokens / (end - begin))
        for s in streams:
            if s.times:
                ttfts.append((s.times[0] - s.started) * 1000)
                gaps += [(b - a) * 1000 for a, b in zip(s.times, s.times[1:], strict=False)]
    return Row(
        server=server_name,
        concurrency=n,
        tokens_per_second=sum(rates) / len(rates),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(gaps, 50),
        itl_p99_ms=percentile(gaps, 99),
        tokens=total,
    )


async def bench(name: str, url: str, model: str, args: argparse.Namespace) -> list[Row]:
    await one_round(url, model, 1, 99, 16)  # warm up
    rows = []
    for n in args.concurrency:
        rounds = [
            await one_round(url, model, n, r + 10 * n, args.tokens) for r in range(args.rounds)
        ]
        row = summarise(name, n, rounds)
        print(
            f"  {name} x{n}: {row.tokens_per_second:.1f} tok/s, "
            f"TTFT p50 {row.ttft_p50_ms:.0f} ms, ITL p50 {row.itl_p50_ms:.1f} ms",
            flush=True,
        )
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    head = (
        f"{'server':<18}{'streams':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'ITL p50':>9}{'ITL p99':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.server:<18}{r.concurrency:>8}{r.tokens_per_second:>9.1f}"
            f"{r.ttft_p50_ms:>10.0f}{r.ttft_p99_ms:>10.0f}{r.itl_p50_ms:>9.1f}{r.itl_p99_ms:>9.1f}"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row], args: argparse.Namespace) -> list[str]:
    by = {(r.server, r.concurrency): r for r in rows}
    low = min(args.concurrency)
    out = []
    batched = sorted({r.server for r in rows if r.server.startswith("cortex")} - {"cortex-serial"})
    for name in batched:
        if (name, low) not in by:
            continue
        a = by[name, low]
        for n in [n for n in args.concurrency if n > low and (name, n) in by]:
            b = by[name, n]
            out.append(
                f"{name} x{n} / x{low}: aggregate {b.tokens_per_second / a.tokens_per_second:.2f}x"
                f", TTFT p50 {b.ttft_p50_ms / a.ttft_p50_ms:.1f}x"
            )
    if ("cortex", low) in by and ("cortex-serial", low) in by:
        ratio = by["cortex", low].tokens_per_second / by["cortex-serial", low].tokens_per_second
        out.append(f"cortex / cortex-serial at x{low}: {ratio:.2f} (target >= 0.95)")
    for baseline in ("llama-server", "llama-cpp-python"):
        ratios = [
            f"x{n} {by['cortex', n].tokens_per_second / by[baseline, n].tokens_per_second:.2f}"
            for n in args.concurrency
            if ("cortex", n) in by and (baseline, n) in by
        ]
        if ratios:
            target = " (target >= 0.95 each)" if baseline == "llama-server" else ""
            out.append(f"cortex / {baseline} aggregate: {', '.join(ratios)}{target}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context of each sequence")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["cortex", "cortex-serial", "llama-cpp-python"],
        choices=["cortex", "cortex-serial", "llama-cpp-python", "llama-server"],
    )
    parser.add_argument("--llama-server", metavar="BIN", help="llama.cpp's llama-server")
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument(
        "--parallel",
        type=int,
        nargs="+",
        default=None,
        help="slots of the batched servers; several run cortex once each (cortex-pN)",
    )
    args = parser.parse_args()
    parallels = args.parallel or [max(args.concurrency)]
    if args.llama_server and "llama-server" not in args.servers:
        args.servers.append("llama-server")
    path = demo_path(args.model)
    load = os.getloadavg()
    print(
        f"{args.model}, {args.threads} threads, greedy, {args.tokens} tokens per stream, "
        f"{args.rounds} rounds, load average before: {load[0]:.2f} (cores: {os.cpu_count()})",
        flush=True,
    )
    rows: list[Row] = []
    for name in args.servers:
        for parallel in parallels if name in ("cortex", "llama-server") else [1]:
            label = (
                name if len(parallels) == 1 or name == "cortex-serial" else f"{name}-p{parallel}"
            )
            with server(name, path, args, parallel) as (url, model):
                rows += trio.run(bench, label, url, model, args)
    print()
    print(table(rows))
    for line in verdicts(rows, args):
        print(line)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
