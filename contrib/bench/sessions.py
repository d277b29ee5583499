"""Agent sessions: does a session's prompt cache survive other sessions' turns?

N agent sessions talk to one neuron (a separate process, the demo instruct
model, ``parallel`` 4). Every session's prompt is a shared system prompt
(``--system`` tokens), its own document (``--document`` tokens), then its
conversation: each turn appends the model's reply and a short question, and
sends the whole conversation again, as Claude Code and IDE agents do. The
sessions' turns are interleaved (every session's turn 1, then every
session's turn 2, ...), ``--concurrency`` requests in flight at once, so
with more sessions than slots a session's slot has gone to another session
by its next turn.

Per turn it reports the time to first token (p50, from sending the request
to the first text, streaming) and the fraction of the prompt read from the
prompt cache (``usage.prompt_tokens_details.cached_tokens`` over
``prompt_tokens``), first turn against later turns, and the neuron's
prompt-cache statistics (``GET /models``). Each N runs twice: with the
engine's host tier (``host_cache_mb``, default the engine's) and without
it (``host_cache_mb = 0``, slots only), unless ``--tiers`` says otherwise.

``--neurons 2`` puts two neurons behind a gateway (``python -m cortex
--role gateway``, least-loaded routing) and sends the sessions there.

    .venv/bin/python contrib/bench/sessions.py [--sessions 4 10] [--turns 3]
        [--max-tokens 8] [--threads 1] [--parallel 4] [--kv-cells 20480]
        [--host-cache-mb MB] [--tiers host slots] [--neurons 1|2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import httpx
import trio

MODEL = "demo"
TEXT = (
    "the system reads each request and checks the file before it writes a new version "
    "of the module while tests run in parallel on every change that reaches the branch "
    "a function returns the value it computed from the input and the caller logs it "
    "errors propagate to the handler which answers with a clear message and a code "
    "configuration comes from one file with defaults for every key and a schema check "
    "the cache keeps recent results in memory and drops the oldest when it is full"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_path() -> str:
    from cortex.neuron import sources

    return str(sources.resolve(sources.DEMO))


def wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.2)


@contextmanager
def process(args: list[str], config: str) -> Iterator[None]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex", *args, "--config", f.name, "--log-level", "warning"]
    )
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # A prompt step in flight can outlast the drain on a busy machine.
            proc.kill()
            proc.wait()
        os.unlink(f.name)


@contextmanager
def neuron(args: argparse.Namespace, host_cache_mb: int | None) -> Iterator[str]:
    """A neuron with the demo model loaded; yields its URL."""
    port = free_port()
    options = (
        f"n_threads = {args.threads}, n_ctx = {args.n_ctx}, parallel = {args.parallel}, "
        f"kv_cells = {args.kv_cells}"
    )
    if host_cache_mb is not None:
        options += f", host_cache_mb = {host_cache_mb}"
    config = (
        f'[neuron]\nlisten = "127.0.0.1:{port}"\n'
        f'[[models]]\nid = "{MODEL}"\nsource = "{demo_path()}"\noptions = {{ {options} }}\n'
    )
    url = f"http://127.0.0.1:{port}"
    with process(["--role", "neuron"], config), httpx.Client(base_url=url, timeout=10) as client:

        def loaded() -> bool:
            models = client.get("/models").json()
            return bool(models) and models[0]["status"] == "loaded"

        wait_until(loaded, "the neuron")
        yield url


@contextmanager
def gateway(neurons: list[str]) -> Iterator[str]:
    """A gateway in front of ``neurons``; yields its URL."""
    port, metrics = free_port(), free_port()
    config = (
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
        + "".join(
            f'[[neurons]]\nname = "n{i}"\nendpoint = "{url}"\n' for i, url in enumerate(neurons)
        )
    )
    url = f"http://127.0.0.1:{port}"
    with process(["--role", "gateway"], config), httpx.Client(base_url=url, timeout=10) as client:
        wait_until(
            lambda: any(m["id"] == MODEL for m in client.get("/v1/models").json()["data"]),
            "the gateway",
        )
        yield url


def text_of(tokens: int, rng: random.Random, count) -> str:
    """Words until the model's tokenizer counts ``tokens`` (within a few)."""
    words = TEXT.split()
    words = [rng.choice(words) for _ in range(tokens)]
    # Shrink to fit: the tokenizer gives about 1.2 tokens a word here.
    n = len(words)
    while count(" ".join(words[:n])) > tokens:
        n = int(n * 0.9)
    return " ".join(words[:n])


@dataclass
class Turn:
    session: int
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


async def run_sessions(
    url: str, args: argparse.Namespace, n: int, system: str, documents: list[str]
) -> list[Turn]:
    conversations = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{documents[i]}\n\nQuestion 1: what is this about?"},
        ]
        for i in range(n)
    ]
    turns: list[Turn] = []
    in_flight = trio.Semaphore(args.concurrency)

    # No read timeout: on a busy machine a queued first turn waits minutes.
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def one(session: int, turn: int) -> None:
            messages = conversations[session]
            body = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            first = None
            reply, usage = [], {}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        content = choice["delta"].get("content")
                        if content:
                            first = first or time.perf_counter()
                            reply.append(content)
            ttft = (first or time.perf_counter()) - started
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            turns.append(Turn(session, turn, ttft, usage["prompt_tokens"], cached))
            messages.append({"role": "assistant", "content": "".join(reply)})
            messages.append(
                {"role": "user", "content": f"Question {turn + 2}: and what follows from that?"}
            )

        async def send(session: int, turn: int) -> None:
            try:
                await one(session, turn)
            finally:
                in_flight.release()

        # Every session's turn t, in session order, before any turn t + 1.
        for turn in range(args.turns):
            async with trio.open_nursery() as nursery:
                for session in range(n):
                    await in_flight.acquire()
                    nursery.start_soon(send, session, turn)
    return turns


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(turns: list[Turn]) -> tuple[float, float, int]:
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    return p50([t.ttft for t in turns]), cached / prompt if prompt else 0.0, len(turns)


def cache_stats(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=10) as client:
        models = client.get("/models").json()
    cache = models[0].get("prompt_cache") or {}
    return {k: v for k, v in cache.items() if k != "blocks"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--system", type=int, default=3000, help="shared system prompt tokens")
    parser.add_argument("--document", type=int, default=1500, help="per-session document tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="default: --parallel x --neurons"
    )
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--kv-cells", type=int, default=20480)
    parser.add_argument("--host-cache-mb", type=int, default=None, help="default: the engine's")
    parser.add_argument("--tiers", nargs="+", choices=("host", "slots"), default=["host", "slots"])
    parser.add_argument("--neurons", type=int, choices=(1, 2), default=1)
    parser.add_argument("--json", help="write every turn's numbers here")
    args = parser.parse_args()
    args.concurrency = args.concurrency or args.parallel * args.neurons

    rows, results = [], []
    for tier in args.tiers:
        host_cache_mb = 0 if tier == "slots" else args.host_cache_mb
        for n in args.sessions:
            with serving(args, host_cache_mb) as (url, neuron_urls):
                with httpx.Client(base_url=neuron_urls[0], timeout=30) as client:

                    def count(text: str) -> int:
                        body = {"model": MODEL, "text": text}
                        return client.post("/tokenize", json=body).json()["count"]

                    rng = random.Random(13)
                    system = text_of(args.system, rng, count)
                    documents = [text_of(args.document, rng, count) for _ in range(n)]
                started = time.perf_counter()
                turns = trio.run(run_sessions, url, args, n, system, documents)
                wall = time.perf_counter() - started
                caches = [cache_stats(u) for u in neuron_urls]
            first = summary([t for t in turns if t.turn == 0])
            later = summary([t for t in turns if t.turn > 0])
            rows.append((tier, n, first, later, wall, caches))
            results.append({"tier": tier, "sessions": n, "turns": [asdict(t) for t in turns]})
            print(
                f"[{tier} n={n}] first p50 {first[0]:.2f}s cached {first[1]:.0%}; "
                f"later p50 {later[0]:.2f}s cached {later[1]:.0%}; {wall:.0f}s; {caches}",
                flush=True,
            )

    print()
    print(
        f"demo model, parallel {args.parallel}, kv_cells {args.kv_cells}, "
        f"{args.threads} thread(s), {args.neurons} neuron(s), concurrency {args.concurrency}, "
        f"~{args.system}+{args.document} prompt tokens, {args.turns} turns, "
        f"{args.max_tokens} tokens a reply"
    )
    header = (
        f"{'tier':<6}{'N':>4}{'first p50 s':>13}{'cached':>8}{'later p50 s':>13}{'cached':>8}"
        f"{'later/first':>13}{'restores':>10}{'failures':>10}{'wall s':>8}"
    )
    print(header)
    for tier, n, first, later, wall, caches in rows:
        restores = sum(c.get("host_restores", 0) for c in caches)
        failures = sum(c.get("host_failures", 0) for c in caches)
        print(
            f"{tier:<6}{n:>4}{first[0]:>13.2f}{first[1]:>8.0%}{later[0]:>13.2f}{later[1]:>8.0%}"
            f"{later[0] / first[0]:>13.2f}{restores:>10}{failures:>10}{wall:>8.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


@contextmanager
def serving(args: argparse.Namespace, host_cache_mb: int | None) -> Iterator[tuple[str, list[str]]]:
    """One neuron, or ``--neurons 2`` behind a gateway: (URL to send to, neuron URLs)."""
    if args.neurons == 1:
        with neuron(args, host_cache_mb) as url:
            yield url, [url]
        return
    with neuron(args, host_cache_mb) as a, neuron(args, host_cache_mb) as b, gateway([a, b]) as gw:
        yield gw, [a, b]


if __name__ == "__main__":
    main()
