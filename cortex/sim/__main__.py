"""``python -m cortex.sim --fleet FILE --trace FILE [--policy NAME] [--replays N] ...``."""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

import attrs

from cortex.config import RoutingSection
from cortex.errors import ConfigError
from cortex.gateway.scheduler import POLICIES
from cortex.sim import bound
from cortex.sim.clairvoyant import CLAIRVOYANT
from cortex.sim.fleet import FleetFile
from cortex.sim.replay import RETRIES, Result, TraceRequest, read_trace, replay
from cortex.sim.report import Bounds, plot, sessions_table, table

KEYS = frozenset(f.name for f in attrs.fields(RoutingSection))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cortex.sim",
        description=(
            "Replay a request trace through the gateway's router against fake neurons "
            "in virtual time; print cold loads, evictions, thrash, time to first token "
            "and unserved requests per routing policy, and lower bounds on the cold loads; "
            "for agent sessions, prompt cache reads and affinity (--compare affinity=false)."
        ),
    )
    parser.add_argument("--fleet", required=True, help="the fleet file (TOML)")
    parser.add_argument("--trace", required=True, help="the trace (JSON lines)")
    parser.add_argument(
        "--policy",
        action="append",
        choices=(*POLICIES, *CLAIRVOYANT),
        help="a routing policy to replay (repeat for several; default: the gateway's three), "
        "or a reference that knows some of the future sends (clairvoyant, clairvoyant-thinks, "
        "clairvoyant-continuation; clairvoyant-none knows what a gateway knows: "
        "cortex.sim.clairvoyant)",
    )
    parser.add_argument(
        "--routing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [routing] key of the fleet file for every policy (repeatable)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="also replay the predictive policy with these [routing] keys changed (repeatable)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw queue depth and models loaded"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the router's loads and evictions"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=RETRIES,
        help="retries of a client after a 503, honouring Retry-After (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="of the first replay (default %(default)s)"
    )
    parser.add_argument(
        "--replays",
        type=int,
        default=1,
        help="replays of each configuration, seeds SEED, SEED+1, ...: the table shows "
        "their median and range (default %(default)s)",
    )
    parser.add_argument(
        "--loop",
        choices=("closed", "open"),
        default="closed",
        help="closed: a session's next request goes after the previous answer and its "
        "think time; open: every request at its time in the trace (default %(default)s)",
    )
    parser.add_argument(
        "--floor",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time limit of the floor's integer program; 0: no bounds (default %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="replays run at once, in processes of their own (default: one per CPU)",
    )
    return parser


def _setting(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a TOML value (a bare word is a string).

    Raises:
      ValueError: no ``=`` in it.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{item!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _run(
    fleet: FleetFile,
    trace: list[TraceRequest],
    run: tuple[str, str, dict[str, Any], int],
    options: dict[str, Any],
) -> Result:
    name, policy, routing, seed = run
    result = replay(fleet, trace, policy, routing=routing, seed=seed, **options)
    result.policy = name
    return result


def _bounds(fleet: FleetFile, trace: list[TraceRequest], time_limit: float) -> Bounds | None:
    """B and the floor for the table (None when not asked for, or without scipy)."""
    max_wait = fleet.gateway_config("predictive").routing.max_wait
    if time_limit <= 0:
        return None
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("cortex.sim: the bounds need scipy (pip install scipy)", file=sys.stderr)
        return None
    models, memory, requests = bound.inputs(fleet, trace)
    instant = bound.bound(models, memory, requests, busy=False)
    found = bound.floor(models, memory, requests, max_wait=max_wait, time_limit=time_limit)
    return Bounds(instant=instant, floor=(found.lower, found.upper), max_wait=max_wait)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s"
    )
    try:
        fleet = FleetFile.read(args.fleet)
        trace = read_trace(args.trace)
        routing = dict(_setting(item) for item in args.routing)
        variants = [dict(_setting(part) for part in item.split(",")) for item in args.compare]
        for changes in [routing, *variants]:
            for key in changes:
                if key not in KEYS:
                    raise ConfigError(f"--routing/--compare: unknown [routing] key {key!r}")
            fleet.gateway_config("predictive", **{**routing, **changes})
        if args.loop != "closed" and any(p in CLAIRVOYANT for p in args.policy or ()):
            raise ValueError("the clairvoyant references need --loop closed")
    except ConfigError as exc:
        print(f"cortex.sim: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cortex.sim: {exc}", file=sys.stderr)
        return 2
    configurations = [(policy, policy, routing) for policy in args.policy or list(POLICIES)]
    configurations += [
        (
            "predictive " + ",".join(f"{k}={v}" for k, v in changes.items()),
            "predictive",
            {**routing, **changes},
        )
        for changes in variants
    ]
    runs = [
        (name, policy, settings, seed)
        for name, policy, settings in configurations
        for seed in range(args.seed, args.seed + max(1, args.replays))
    ]
    options = {"retries": args.retries, "loop": args.loop}
    jobs = max(1, min(args.jobs, len(runs)))
    if jobs == 1:
        bounds = _bounds(fleet, trace, args.floor)
        results = [_run(fleet, trace, run, options) for run in runs]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(_run, fleet, trace, run, options) for run in runs]
            bounds = _bounds(fleet, trace, args.floor)
            results = [future.result() for future in futures]
    print(table(results, bounds))
    if any(r.agent for r in trace):
        print()
        print(sessions_table(results))
    if args.plot:
        try:
            plot([r for r in results if r.seed == args.seed], args.plot)
        except ImportError:
            print(
                "cortex.sim: --plot needs matplotlib (pip install 'cortex[sim]')", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
