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

``--agents N`` adds N agent sessions (Claude Code, an IDE agent) to that
traffic, all on one model (``--agent-model``, default the most popular),
starting at uniform times over ``--agent-spread`` seconds. Each is a
conversation that the client re-sends whole every turn: a system prompt
shared by every session of its kind (``--agent-kinds`` of them,
``--system-tokens`` long), an opening document of its own
(``--document-tokens``), then per turn a user or tool message (log-normal,
median ``--turn-tokens``) and the model's answer (median
``--answer-tokens``), which the next turn repeats. Turns per session are
geometric with mean ``--turns``; the next turn goes ``--agent-think``
seconds (exponential) after the answer; but a share ``--tool-share``
(default 0.7) of the answers, all but a session's last, call a tool, and
the next turn (the tool's result) goes after the tool's run instead:
log-normal seconds, median ``--tool-median`` (2), sigma ``--tool-sigma``
(1.2: a p99 of about 30 s). Their lines carry the prompt as
named token runs (``"prompt": [["system-0", 3000], ["document-4", 1500],
["user-4-0", 310], ["answer-4-0", 140], ...]``), the run the answer is
(``"answer"``), and a session key (``"key"``, Claude Code's session header)
for a share ``--agent-keys`` of the sessions; the others count on the
gateway's prefix index alone; and ``"tool": true`` when the answer calls
a tool (the client replays it to the router as the proxy would:
``Router.release(follows=True)``).
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
    #: Agent sessions (0: none); see the module docstring.
    agents: int = 0
    agent_model: str | None = None
    agent_kinds: int = 2
    agent_spread: float = 300.0
    system_tokens: int = 3000
    document_tokens: int = 1500
    turn_tokens: int = 300
    answer_tokens: int = 150
    turns: float = 12.0
    agent_think: float = 10.0
    #: Share of agent sessions that send a session key.
    agent_keys: float = 1.0
    #: Share of agent turns (all but a session's last) whose answer calls a
    #: tool, and the tool's seconds (log-normal: median, and sigma of its log).
    tool_share: float = 0.7
    tool_median: float = 2.0
    tool_sigma: float = 1.2


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
    requests: list[TraceRequest] = []
    if rate <= 0:
        return requests
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


def _agents(fleet: FleetFile, settings: TraceSettings, first: int) -> list[TraceRequest]:
    """``settings.agents`` agent sessions, numbered from ``first`` (deterministic for a seed)."""
    if settings.agents <= 0:
        return []
    rng = random.Random(f"{settings.seed}-agents")
    # Tool calls from a generator of their own: with none, the trace is the
    # one this seed gave before tools were modelled.
    tools = random.Random(f"{settings.seed}-tools")
    if settings.agent_model is not None:
        spec = fleet.model(settings.agent_model)
    else:
        # The most popular model of the ordinary traffic (its rank order).
        models = [m.id for m in fleet.models]
        random.Random(settings.seed).shuffle(models)
        spec = fleet.model(models[0])
    requests = []
    for n in range(settings.agents):
        at = rng.uniform(0, settings.agent_spread)
        kind = rng.randrange(max(1, settings.agent_kinds))
        keyed = rng.random() < settings.agent_keys
        count = 1 + int(math.log(1 - rng.random()) / math.log(1 - 1 / max(settings.turns, 1.0)))
        runs: list[tuple[str, int]] = [
            (f"system-{kind}", settings.system_tokens),
            (f"document-{n}", settings.document_tokens),
        ]
        think, new = 0.0, sum(size for _, size in runs)
        for turn in range(count):
            if at >= settings.duration:
                break
            message = max(8, int(rng.lognormvariate(math.log(settings.turn_tokens), 0.6)))
            answer = max(8, int(rng.lognormvariate(math.log(settings.answer_tokens), 0.5)))
            # A session ends on an answer in words; before, the answer calls a tool.
            tool = turn + 1 < count and tools.random() < settings.tool_share
            runs.append((f"user-{n}-{turn}", message))
            new += message
            requests.append(
                TraceRequest(
                    t=round(at, 3),
                    model=spec.id,
                    prompt_tokens=sum(size for _, size in runs),
                    max_tokens=answer,
                    stream=True,
                    usage=True,
                    session=first + n,
                    think=round(think, 3),
                    prompt=tuple(runs),
                    answer=f"answer-{n}-{turn}",
                    key=f"agent-{n}" if keyed else None,
                    tool=tool,
                )
            )
            # Answered on an idle fleet that kept the conversation cached.
            answered = new / spec.prefill_tokens_per_second + answer / spec.tokens_per_second
            think = rng.expovariate(1 / settings.agent_think)
            if tool:
                # The tool runs, and the client sends its result at once.
                think = tools.lognormvariate(math.log(settings.tool_median), settings.tool_sigma)
            at += answered + think
            runs.append((f"answer-{n}-{turn}", answer))
            new = answer
    return requests


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
    """A trace for ``fleet`` (deterministic for a seed): the traffic, then its agents.

    Raises:
      ConfigError: ``agent_model`` is not a model of the fleet.
    """
    if settings.agent_model is not None and settings.agent_model not in {
        m.id for m in fleet.models
    }:
        raise ConfigError(f"--agent-model: {settings.agent_model!r} is not a model of the fleet")
    traffic = _traffic(fleet, settings)
    first = 1 + max((r.session for r in traffic if r.session is not None), default=-1)
    return sorted([*traffic, *_agents(fleet, settings, first)], key=lambda r: r.t)


def _traffic(fleet: FleetFile, settings: TraceSettings) -> list[TraceRequest]:
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
        if r.prompt:
            line["prompt"] = [list(run) for run in r.prompt]
        if r.answer is not None:
            line["answer"] = r.answer
        if r.key is not None:
            line["key"] = r.key
        if r.tool:
            line["tool"] = True
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
    agents = parser.add_argument_group("agent sessions (shared prefix, growing context)")
    agents.add_argument(
        "--agents", type=int, default=defaults.agents, help="agent sessions to add (default 0)"
    )
    agents.add_argument("--agent-model", help="their model (default: the most popular)")
    agents.add_argument(
        "--agent-kinds", type=int, default=defaults.agent_kinds, help="distinct system prompts"
    )
    agents.add_argument(
        "--agent-spread",
        type=float,
        default=defaults.agent_spread,
        help="seconds over which they start",
    )
    agents.add_argument("--system-tokens", type=int, default=defaults.system_tokens)
    agents.add_argument("--document-tokens", type=int, default=defaults.document_tokens)
    agents.add_argument(
        "--turn-tokens", type=int, default=defaults.turn_tokens, help="median message per turn"
    )
    agents.add_argument(
        "--answer-tokens", type=int, default=defaults.answer_tokens, help="median answer"
    )
    agents.add_argument(
        "--turns", type=float, default=defaults.turns, help="mean turns per session"
    )
    agents.add_argument(
        "--agent-think",
        type=float,
        default=defaults.agent_think,
        help="mean seconds from an answer to the next turn",
    )
    agents.add_argument(
        "--agent-keys",
        type=float,
        default=defaults.agent_keys,
        help="share of sessions that send a session key",
    )
    agents.add_argument(
        "--tool-share",
        type=float,
        default=defaults.tool_share,
        help="share of turns (all but a session's last) whose answer calls a tool",
    )
    agents.add_argument(
        "--tool-median",
        type=float,
        default=defaults.tool_median,
        help="median seconds a tool runs before its result is sent (log-normal)",
    )
    agents.add_argument(
        "--tool-sigma",
        type=float,
        default=defaults.tool_sigma,
        help="sigma of the log of the tool's seconds: its tail",
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
        agents=args.agents,
        agent_model=args.agent_model,
        agent_kinds=args.agent_kinds,
        agent_spread=args.agent_spread,
        system_tokens=args.system_tokens,
        document_tokens=args.document_tokens,
        turn_tokens=args.turn_tokens,
        answer_tokens=args.answer_tokens,
        turns=args.turns,
        agent_think=args.agent_think,
        agent_keys=args.agent_keys,
        tool_share=args.tool_share,
        tool_median=args.tool_median,
        tool_sigma=args.tool_sigma,
    )
    try:
        requests = generate(fleet, settings)
    except ConfigError as exc:
        print(f"cortex.sim.trace: {exc.message}", file=sys.stderr)
        return 2
    found = working_set(fleet, requests, settings.window)
    agent_turns = sum(1 for r in requests if r.agent)
    print(
        f"{len(requests)} requests over {settings.duration:g} s ({agent_turns} agent turns), "
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
