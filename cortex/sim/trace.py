"""Trace generator: Zipf popularity, bursty sessions, a working set ~2x the fleet.

``python -m cortex.sim.trace --fleet FLEET.toml --out TRACE.jsonl``

Sessions start as a Poisson process; each picks a model by Zipf popularity
(the fleet file's models in a seeded random order of rank) and sends a burst
of requests to it, a geometric number of them, each once the previous one
would have been answered on an idle fleet plus an exponential think time
(an agent calling its model, running tools, calling again). Prompt
and completion lengths are log-normal. The session rate is chosen so that
the working set (memory of the distinct models asked for in a
``--window``, averaged over the trace) is ``--working-set`` times the
fleet's memory. A share ``--stream`` of requests stream, and a share
``--usage`` of those ask for token counts (a non-streamed answer always has
them): what the gateway's proxy can measure. Every request is a JSON line
``{"t": seconds, "model": id, "prompt_tokens": n, "max_tokens": n,
"stream": b, "usage": b, "session": n, "think": seconds}``; a closed-loop
replay sends a session's next request ``think`` seconds after the previous
answer instead of at ``t``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence

import attrs

from cortex.errors import ConfigError
from cortex.sim.fleet import FleetFile
from cortex.sim.replay import TraceRequest


@attrs.frozen
class TraceSettings:
    duration: float = 3600.0
    seed: int = 1
    #: Zipf exponent of model popularity.
    zipf: float = 1.0
    #: Mean requests per session, and mean seconds between them.
    burst: float = 8.0
    think: float = 20.0
    #: Median prompt and completion tokens.
    prompt_tokens: int = 1500
    max_tokens: int = 250
    #: Target working set over the fleet's memory, and its window in seconds.
    working_set: float = 2.0
    window: float = 600.0
    #: Sessions per minute; None: chosen to reach ``working_set``.
    sessions_per_minute: float | None = None
    #: Share of requests that stream, and of streams that ask for usage.
    stream: float = 0.8
    usage: float = 0.5


def _sessions(
    fleet: FleetFile, settings: TraceSettings, rate: float, rng: random.Random
) -> list[TraceRequest]:
    specs = {m.id: m for m in fleet.models}
    models = list(specs)
    rng.shuffle(models)
    weights = [1 / (rank + 1) ** settings.zipf for rank in range(len(models))]
    # Flags from a generator of their own: the same seed gives the same times
    # and lengths whatever the shares.
    flags = random.Random(f"{settings.seed}-flags")
    requests = []
    t = rng.expovariate(rate / 60)
    session = 0
    while t < settings.duration:
        model = rng.choices(models, weights)[0]
        count = 1 + int(math.log(1 - rng.random()) / math.log(1 - 1 / settings.burst))
        at = t
        spec = specs[model]
        think = 0.0
        for _ in range(count):
            if at >= settings.duration:
                break
            prompt = max(16, int(rng.lognormvariate(math.log(settings.prompt_tokens), 0.6)))
            completion = max(8, int(rng.lognormvariate(math.log(settings.max_tokens), 0.5)))
            stream = flags.random() < settings.stream
            requests.append(
                TraceRequest(
                    t=round(at, 3),
                    model=model,
                    prompt_tokens=prompt,
                    max_tokens=completion,
                    stream=stream,
                    usage=not stream or flags.random() < settings.usage,
                    session=session,
                    think=round(think, 3),
                )
            )
            answered = prompt / spec.prefill_tokens_per_second + completion / spec.tokens_per_second
            think = rng.expovariate(1 / settings.think)
            at += answered + think
        session += 1
        t += rng.expovariate(rate / 60)
    return sorted(requests, key=lambda r: r.t)


def working_set(fleet: FleetFile, requests: Sequence[TraceRequest], window: float) -> float:
    """Mean memory of the distinct models asked for per ``window``, over the fleet's memory."""
    if not requests:
        return 0.0
    sizes = {m.id: m.vram_mb for m in fleet.models}
    end = requests[-1].t
    step = window / 10
    totals = []
    start, lo = 0.0, 0
    while start + window <= max(end, window):
        while lo < len(requests) and requests[lo].t < start:
            lo += 1
        seen = set()
        for r in requests[lo:]:
            if r.t >= start + window:
                break
            seen.add(r.model)
        totals.append(sum(sizes[m] for m in seen))
        start += step
    return sum(totals) / len(totals) / fleet.memory_mb


def generate(fleet: FleetFile, settings: TraceSettings) -> list[TraceRequest]:
    """A trace for ``fleet`` (deterministic for a seed)."""
    if settings.sessions_per_minute is not None:
        return _sessions(
            fleet, settings, settings.sessions_per_minute, random.Random(settings.seed)
        )
    # The working set grows with the session rate: bisect for the target.
    low, high = 0.01, 60.0
    for _ in range(30):
        rate = math.sqrt(low * high)
        found = working_set(
            fleet, _sessions(fleet, settings, rate, random.Random(settings.seed)), settings.window
        )
        if found < settings.working_set:
            low = rate
        else:
            high = rate
    return _sessions(fleet, settings, high, random.Random(settings.seed))


def write(requests: Sequence[TraceRequest], out: object) -> None:
    for r in requests:
        line: dict[str, object] = {
            "t": r.t,
            "model": r.model,
            "prompt_tokens": r.prompt_tokens,
            "max_tokens": r.max_tokens,
            "stream": r.stream,
            "usage": r.usage,
        }
        if r.session is not None:
            line["session"] = r.session
            line["think"] = r.think
        print(json.dumps(line), file=out)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cortex.sim.trace",
        description="Write a request trace (JSON lines) for a fleet file.",
    )
    defaults = TraceSettings()
    parser.add_argument("--fleet", required=True, help="the fleet file (TOML)")
    parser.add_argument("--out", default="-", help="where to write it (default: stdout)")
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--zipf", type=float, default=defaults.zipf, help="popularity exponent")
    parser.add_argument(
        "--burst", type=float, default=defaults.burst, help="mean requests per session"
    )
    parser.add_argument(
        "--think", type=float, default=defaults.think, help="mean seconds between them"
    )
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument(
        "--working-set", type=float, default=defaults.working_set, help="target, x fleet memory"
    )
    parser.add_argument(
        "--window", type=float, default=defaults.window, help="of the working set, s"
    )
    parser.add_argument(
        "--sessions-per-minute", type=float, default=None, help="fixed rate (no working-set target)"
    )
    parser.add_argument(
        "--stream", type=float, default=defaults.stream, help="share of requests that stream"
    )
    parser.add_argument(
        "--usage", type=float, default=defaults.usage, help="share of streams that ask for usage"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fleet = FleetFile.read(args.fleet)
    except ConfigError as exc:
        print(f"cortex.sim.trace: {exc.message}", file=sys.stderr)
        return 2
    settings = TraceSettings(
        duration=args.duration,
        seed=args.seed,
        zipf=args.zipf,
        burst=args.burst,
        think=args.think,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        working_set=args.working_set,
        window=args.window,
        sessions_per_minute=args.sessions_per_minute,
        stream=args.stream,
        usage=args.usage,
    )
    requests = generate(fleet, settings)
    found = working_set(fleet, requests, settings.window)
    print(
        f"{len(requests)} requests over {settings.duration:g} s, "
        f"working set {found:.2f}x the fleet's memory",
        file=sys.stderr,
    )
    if args.out == "-":
        write(requests, sys.stdout)
    else:
        with open(args.out, "w") as f:
            write(requests, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
