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

Per turn it reports the time to first token (p50 and p99, from sending the
request to the first text, streaming) and the fraction of the prompt read
from the prompt cache (``usage.prompt_tokens_details.cached_tokens`` over
``prompt_tokens``), first turn against later turns, the requests each
neuron served and its prompt-cache statistics (``GET /models``). Each N
runs with the engine's host tier (``host_cache_mb``, default the engine's)
and without it (``host_cache_mb = 0``, slots only), unless ``--tiers`` says
otherwise.

``--neurons 2`` puts two neurons behind a gateway (``python -m cortex
--role gateway``) and sends the sessions there, once per ``--routing``:
``affinity`` (the default ``predictive`` policy, which sends a request
where its prefix is cached until that replica is saturated) and
``least-loaded`` (``policy = "fixed"``: the least busy replica, blind to
caches), and on request ``no-affinity`` (the predictive policy with
``[routing] affinity = false``: queues and loads weighed, prompt caches
not). The gateway's ``cortex_affinity_total`` (kept / broken / new) is
printed beside.

``--llama-server BIN`` runs the same sessions, in the same run, against
llama.cpp's own server on one host: ``-np`` ``--parallel``, its host
prompt cache ``--cache-ram 8192`` (its default), ``--no-repack`` (its
repacked weights crash on CPUs with AMX), the same model file and threads
as one neuron, and a context of ``--parallel`` times the longest session.

    .venv/bin/python contrib/bench/sessions.py [--sessions 4 10] [--turns 3]
        [--max-tokens 8] [--threads 1] [--parallel 4] [--kv-cells 20480]
        [--kv-unified true|false] [--host-cache-mb MB] [--tiers host slots] [--neurons 1|2]
        [--routing affinity least-loaded no-affinity] [--llama-server BIN [--no-cortex]]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

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
#: The gateway's ``[routing]`` for each ``--routing``: its policy and affinity.
ROUTINGS = {
    "affinity": ("predictive", True),
    "least-loaded": ("fixed", True),
    "no-affinity": ("predictive", False),
}
#: llama-server's host prompt cache, MiB: its default, named to be explicit.
LLAMA_SERVER_CACHE_RAM = 8192
#: Tokens a turn adds besides the reply (the question and the chat template's
#: markers), and the template's own, for sizing llama-server's context.
TURN_OVERHEAD = 32
TEMPLATE_OVERHEAD = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_path() -> str:
    from cortex.neuron import sources

    return str(sources.resolve(sources.DEMO))


def wait_until(check, what: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it came up")
        try:
            if check():
                return
        except (httpx.TransportError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.2)


@contextmanager
def process(command: list[str], log: int | None = None) -> Iterator[subprocess.Popen]:
    """``command`` running; ``log``: a file its output goes to (default: ours)."""
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT if log is not None else None
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # A prompt step in flight can outlast the drain on a busy machine.
            proc.kill()
            proc.wait()


@contextmanager
def cortex(role: str, config: str) -> Iterator[subprocess.Popen]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
    command = [sys.executable, "-m", "cortex", "--role", role, "--config", f.name]
    try:
        with process([*command, "--log-level", "warning"]) as proc:
            yield proc
    finally:
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
    if args.kv_unified is not None:
        options += f", kv_unified = {args.kv_unified}"
    config = (
        f'[neuron]\nlisten = "127.0.0.1:{port}"\n'
        f'[[models]]\nid = "{MODEL}"\nsource = "{demo_path()}"\noptions = {{ {options} }}\n'
    )
    url = f"http://127.0.0.1:{port}"
    with cortex("neuron", config) as proc, httpx.Client(base_url=url, timeout=10) as client:

        def loaded() -> bool:
            models = client.get("/models").json()
            return bool(models) and models[0]["status"] == "loaded"

        wait_until(loaded, "the neuron", proc)
        yield url


@contextmanager
def gateway(neurons: list[str], routing: str) -> Iterator[tuple[str, str]]:
    """A gateway in front of ``neurons``; yields its URL and its metrics URL."""
    port, metrics = free_port(), free_port()
    config = (
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
        f'[routing]\npolicy = "{ROUTINGS[routing][0]}"\n'
        f"affinity = {str(ROUTINGS[routing][1]).lower()}\n"
        + "".join(
            f'[[neurons]]\nname = "n{i}"\nendpoint = "{url}"\n' for i, url in enumerate(neurons)
        )
    )
    url = f"http://127.0.0.1:{port}"
    with cortex("gateway", config) as proc, httpx.Client(base_url=url, timeout=10) as client:
        # Every neuron polled and its model seen, or the first turns all go
        # to the one the gateway happened to poll first.
        def ready() -> bool:
            health = client.get("/health").json()
            neurons_up = [n for n in health["neurons"] if n["up"] and MODEL in n["models"]]
            return len(neurons_up) == len(neurons)

        wait_until(ready, "the gateway", proc)
        yield url, f"http://127.0.0.1:{metrics}"


def longest_session(args: argparse.Namespace) -> int:
    """Tokens in a session's last prompt and reply, at most."""
    return (
        args.system
        + args.document
        + TEMPLATE_OVERHEAD
        + args.turns * (args.max_tokens + TURN_OVERHEAD)
    )


@contextmanager
def llama_server(args: argparse.Namespace) -> Iterator[str]:
    """llama.cpp's llama-server on the demo model, as the issue names it; yields its URL."""
    port = free_port()
    # Room for every slot's longest session, in whole 256-token pages.
    per_slot = math.ceil(longest_session(args) / 256) * 256
    command = [
        args.llama_server, "-m", demo_path(), "-a", MODEL, "--host", "127.0.0.1",
        "--port", str(port), "-np", str(args.parallel), "-c", str(per_slot * args.parallel),
        "--cache-ram", str(LLAMA_SERVER_CACHE_RAM), "--no-repack",
        "-t", str(args.threads), "-tb", str(args.threads),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # Its log is kept aside, shown when it fails (and how it exited).
    with tempfile.TemporaryFile() as log:
        with (
            process(command, log.fileno()) as proc,
            httpx.Client(base_url=url, timeout=10) as client,
        ):
            try:
                wait_until(lambda: client.get("/health").status_code == 200, "llama-server", proc)
                yield url
            except BaseException:
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
                sys.stderr.write(f"llama-server: exit status {proc.poll()}\n")
                raise


def text_of(tokens: int, rng: random.Random, count: Callable[[str], int]) -> str:
    """Words until the model's tokenizer counts ``tokens`` (within a few)."""
    words = TEXT.split()
    words = [rng.choice(words) for _ in range(tokens)]
    # Shrink to fit: the tokenizer gives about 1.2 tokens a word here.
    n = len(words)
    while count(" ".join(words[:n])) > tokens:
        n = int(n * 0.9)
    return " ".join(words[:n])


def counter(client: httpx.Client, kind: str) -> Callable[[str], int]:
    """Tokens in a text, by the server's own tokenizer (a neuron's or llama-server's)."""

    def count(text: str) -> int:
        if kind == "llama-server":
            return len(client.post("/tokenize", json={"content": text}).json()["tokens"])
        return client.post("/tokenize", json={"model": MODEL, "text": text}).json()["count"]

    return count


@dataclass
class Turn:
    session: int
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


def cached_of(chunk: dict) -> int | None:
    """Prompt tokens read from cache, from a final chunk: usage, else llama-server's timings."""
    details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
    if "cached_tokens" in details:
        return details["cached_tokens"]
    timings = chunk.get("timings") or {}
    return timings.get("cache_n")


async def run_sessions(
    url: str,
    args: argparse.Namespace,
    n: int,
    system: str,
    documents: list[str],
    keepalive: bool = True,
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
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

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
            reply, usage, cached = [], {}, None
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    found = cached_of(chunk)
                    cached = found if found is not None else cached
                    for choice in chunk.get("choices") or ():
                        content = choice["delta"].get("content")
                        if content:
                            first = first or time.perf_counter()
                            reply.append(content)
            ttft = (first or time.perf_counter()) - started
            turns.append(Turn(session, turn, ttft, usage["prompt_tokens"], cached or 0))
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


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (p99 of 30 values is their largest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Summary:
    p50: float
    p99: float
    cached: float
    requests: int

    @classmethod
    def of(cls, turns: list[Turn]) -> Summary:
        prompt = sum(t.prompt_tokens for t in turns)
        cached = sum(t.cached_tokens for t in turns)
        ttfts = [t.ttft for t in turns]
        return cls(
            p50=statistics.median(ttfts) if ttfts else float("nan"),
            p99=quantile(ttfts, 0.99),
            cached=cached / prompt if prompt else 0.0,
            requests=len(turns),
        )


@dataclass
class Row:
    """One N in one mode: the numbers the table prints."""

    sessions: int
    mode: str
    first: Summary
    later: Summary
    wall: float
    #: Requests each neuron (or llama-server) served, in order.
    per_neuron: list[int]
    #: The neurons' prompt-cache statistics (without the block hashes).
    caches: list[dict] = field(default_factory=list)
    #: The gateway's cortex_affinity_total by result.
    affinity: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.later.p50 / self.first.p50 if self.first.p50 else float("nan")


def cache_stats(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=10) as client:
        models = client.get("/models").json()
    cache = models[0].get("prompt_cache") or {}
    return {k: v for k, v in cache.items() if k != "blocks"}


def affinity_counts(metrics_url: str) -> dict[str, int]:
    """The gateway's ``cortex_affinity_total`` by result (kept, broken, new)."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    found = re.findall(r'^cortex_affinity_total\{result="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {result: int(float(value)) for result, value in found}


@contextmanager
def serving(
    args: argparse.Namespace, host_cache_mb: int | None, routing: str | None
) -> Iterator[tuple[str, list[str], str | None]]:
    """One neuron, or two behind a gateway routing by ``routing``.

    Yields (URL to send to, neuron URLs, the gateway's metrics URL or None).
    """
    if args.neurons == 1:
        with neuron(args, host_cache_mb) as url:
            yield url, [url], None
        return
    assert routing is not None
    with (
        neuron(args, host_cache_mb) as a,
        neuron(args, host_cache_mb) as b,
        gateway([a, b], routing) as (url, metrics),
    ):
        yield url, [a, b], metrics


def texts(n: int, args: argparse.Namespace, count: Callable[[str], int]) -> tuple[str, list[str]]:
    """The shared system prompt and each session's document (the same for every mode)."""
    rng = random.Random(13)
    system = text_of(args.system, rng, count)
    return system, [text_of(args.document, rng, count) for _ in range(n)]


def measure(
    url: str, args: argparse.Namespace, n: int, count: Callable[[str], int], keepalive: bool = True
) -> tuple[list[Turn], float]:
    system, documents = texts(n, args, count)
    started = time.perf_counter()
    turns = trio.run(run_sessions, url, args, n, system, documents, keepalive)
    return turns, time.perf_counter() - started


def run_cortex(
    args: argparse.Namespace, n: int, tier: str, routing: str | None
) -> tuple[Row, list[Turn]]:
    host_cache_mb = 0 if tier == "slots" else args.host_cache_mb
    with serving(args, host_cache_mb, routing) as (url, neuron_urls, metrics):
        with httpx.Client(base_url=neuron_urls[0], timeout=30) as client:
            turns, wall = measure(url, args, n, counter(client, "neuron"))
        caches = [cache_stats(u) for u in neuron_urls]
        affinity = affinity_counts(metrics) if metrics else {}
    mode = f"{routing or '1 neuron'}, {tier}"
    return Row(
        sessions=n,
        mode=mode,
        first=Summary.of([t for t in turns if t.turn == 0]),
        later=Summary.of([t for t in turns if t.turn > 0]),
        wall=wall,
        per_neuron=[c.get("hits", 0) + c.get("misses", 0) for c in caches],
        caches=caches,
        affinity=affinity,
    ), turns


def run_llama_server(args: argparse.Namespace, n: int) -> tuple[Row, list[Turn]]:
    with llama_server(args) as url, httpx.Client(base_url=url, timeout=30) as client:
        # Its HTTP server drops idle keep-alive connections (after 5 s) with
        # no answer to a request just sent on one: a new connection each.
        turns, wall = measure(url, args, n, counter(client, "llama-server"), keepalive=False)
    return Row(
        sessions=n,
        mode="llama-server",
        first=Summary.of([t for t in turns if t.turn == 0]),
        later=Summary.of([t for t in turns if t.turn > 0]),
        wall=wall,
        per_neuron=[len(turns)],
    ), turns


def table(rows: list[Row]) -> str:
    header = (
        f"{'N':>3}  {'mode':<22}{'turn 1 p50':>11}{'later p50':>10}{'p99':>8}{'ratio':>7}"
        f"{'cached 1':>9}{'later':>7}  {'per neuron':<11}{'kept/broken/new':>16}{'wall s':>8}"
    )
    lines = [header]
    for r in rows:
        per = "/".join(str(c) for c in r.per_neuron)
        kbn = (
            "/".join(str(r.affinity.get(k, 0)) for k in ("kept", "broken", "new"))
            if r.affinity
            else "-"
        )
        lines.append(
            f"{r.sessions:>3}  {r.mode:<22}{r.first.p50:>11.2f}{r.later.p50:>10.2f}"
            f"{r.later.p99:>8.2f}{r.ratio:>7.2f}{r.first.cached:>9.0%}{r.later.cached:>7.0%}"
            f"  {per:<11}{kbn:>16}{r.wall:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument(
        "--kv-unified",
        choices=("true", "false"),
        help="the engine's kv_unified (false: per-slot streams, --kv-cells unused); "
        "default: kv_cells asks for the unified pool",
    )
    parser.add_argument("--host-cache-mb", type=int, default=None, help="default: the engine's")
    parser.add_argument("--tiers", nargs="+", choices=("host", "slots"), default=["host", "slots"])
    parser.add_argument("--neurons", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--routing",
        nargs="+",
        choices=tuple(ROUTINGS),
        default=["affinity", "least-loaded"],
        help="with --neurons 2: the gateway's routing, one run each",
    )
    parser.add_argument(
        "--llama-server", metavar="BIN", help="also run llama.cpp's llama-server on one host"
    )
    parser.add_argument(
        "--no-cortex", action="store_true", help="only llama-server (with --llama-server)"
    )
    parser.add_argument("--json", help="write every row and turn here")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or args.parallel * args.neurons
    if args.no_cortex and not args.llama_server:
        parser.error("--no-cortex needs --llama-server")
    routings: list[str | None] = list(args.routing) if args.neurons == 2 else [None]

    rows: list[Row] = []
    results = []
    failed: list[str] = []
    for n in args.sessions:
        runs: list[tuple[str, str | None]] = []
        if not args.no_cortex:
            runs = [(tier, routing) for tier in args.tiers for routing in routings]
        jobs = [
            (f"{routing or '1 neuron'}, {tier}", partial(run_cortex, args, n, tier, routing))
            for tier, routing in runs
        ]
        if args.llama_server:
            jobs.append(("llama-server", partial(run_llama_server, args, n)))
        for mode, job in jobs:
            try:
                row, turns = job()
            except Exception as exc:
                # A run that fails (a 504 from a turn that waited past the
                # gateway's first_byte_timeout, say) is reported and
                # skipped; the table still shows every run that finished.
                failed.append(f"{mode} n={n}: {leaf(exc)!r}")
                print(f"[{mode} n={n}] failed: {leaf(exc)!r}", flush=True)
                continue
            rows.append(row)
            results.append({"row": asdict(row), "turns": [asdict(t) for t in turns]})
            report(row)

    print()
    kv = "per-slot KV streams" if args.kv_unified == "false" else f"kv_cells {args.kv_cells}"
    print(
        f"demo model, parallel {args.parallel}, {kv}, "
        f"{args.threads} thread(s), {args.neurons} neuron(s), concurrency {args.concurrency}, "
        f"~{args.system}+{args.document} prompt tokens, {args.turns} turns, "
        f"{args.max_tokens} tokens a reply; TTFT in seconds, ratio = later p50 / turn 1 p50"
    )
    print(table(rows))
    for failure in failed:
        print(f"failed: {failure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if failed:
        sys.exit(1)


def leaf(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups (trio's nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def report(row: Row) -> None:
    print(
        f"[{row.mode} n={row.sessions}] first p50 {row.first.p50:.2f}s cached "
        f"{row.first.cached:.0%}; later p50 {row.later.p50:.2f}s cached {row.later.cached:.0%}; "
        f"per neuron {row.per_neuron}; {row.wall:.0f}s; {row.caches} {row.affinity}",
        flush=True,
    )


if __name__ == "__main__":
    main()
