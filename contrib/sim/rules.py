"""Search the reference rule's constants against issue 12's target, trace by trace.

``python contrib/sim/rules.py --fleet contrib/sim/fleet.toml --trace s1.jsonl
--trace s5.jsonl [--replays 3] [--horizon 15 --horizon 30 ...]``

Replays ``fixed`` and ``clairvoyant-none`` (the rule on what a gateway
knows, :mod:`cortex.sim.clairvoyant`) under every combination of the
given ``--horizon``, ``--quiet``, ``--tail`` (``patience_tail``),
``--regret`` and ``--victims`` values, and prints, per configuration and
trace, the median cold loads / p99 time to first token over the replays,
the share of the way from ``fixed``'s cold loads to B (bound.py's instant
value), and ``*`` where the target holds there: at least 40% of the way at
a p99 no higher than ``fixed``'s, nothing unserved. Last, per trace, the
best share any configuration reached at that p99: what choosing the
constants for that trace alone, after the fact, would give.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import logging
import math
import os
import statistics
import sys
from collections.abc import Sequence

from cortex.sim import bound
from cortex.sim.clairvoyant import HORIZON, QUIET, Rule
from cortex.sim.fleet import FleetFile
from cortex.sim.replay import Result, read_trace, replay

TARGET = 0.4


def _p99(result: Result) -> float:
    ttfts = sorted(result.ttfts())
    return ttfts[math.ceil(0.99 * len(result.outcomes)) - 1]


def _run(fleet_path: str, trace_path: str, policy: str, tail: float, rule: Rule, seed: int):
    logging.disable(logging.CRITICAL)
    fleet = FleetFile.read(fleet_path)
    result = replay(
        fleet,
        read_trace(trace_path),
        policy,
        seed=seed,
        routing={"patience_tail": tail},
        rule=rule if policy != "fixed" else None,
    )
    return result.cold_loads, _p99(result), result.unserved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--trace", action="append", required=True)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--horizon", type=float, action="append")
    parser.add_argument("--quiet", type=float, action="append")
    parser.add_argument("--tail", type=float, action="append")
    parser.add_argument("--regret", choices=["mib", "loads"], action="append")
    parser.add_argument("--victims", choices=["chance", "density"], action="append")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    rules = [
        (tail, Rule(horizon, quiet, regret, victims))
        for horizon, quiet, tail, regret, victims in itertools.product(
            args.horizon or [HORIZON],
            args.quiet or [QUIET],
            args.tail or [97.0],
            args.regret or ["mib"],
            args.victims or ["chance"],
        )
    ]
    fleet = FleetFile.read(args.fleet)
    seeds = range(max(1, args.replays))
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:

        def medians(policy: str, tail: float, rule: Rule) -> dict[str, tuple[float, float, int]]:
            futures = {
                path: [
                    pool.submit(_run, args.fleet, path, policy, tail, rule, seed) for seed in seeds
                ]
                for path in args.trace
            }
            out = {}
            for path, runs in futures.items():
                results = [f.result() for f in runs]
                out[path] = (
                    statistics.median(r[0] for r in results),
                    statistics.median(r[1] for r in results),
                    max(r[2] for r in results),
                )
            return out

        fixed = medians("fixed", 97.0, Rule())
        floors = {}
        for path in args.trace:
            models, memory, requests = bound.inputs(fleet, read_trace(path))
            floors[path] = bound.bound(models, memory, requests, busy=False)
        print("fixed: " + "  ".join(f"{p}: {fixed[p][0]:g} / {fixed[p][1]:.2f}" for p in fixed))
        print("B:     " + "  ".join(f"{p}: {floors[p]:g}" for p in floors))
        best: dict[str, tuple[float, str]] = {p: (-math.inf, "") for p in args.trace}
        for tail, rule in rules:
            name = (
                f"horizon={rule.horizon:g} quiet={rule.quiet:g} tail={tail:g} "
                f"regret={rule.regret} victims={rule.victims}"
            )
            cells, met = [], 0
            for path, (loads, p99, unserved) in medians("clairvoyant-none", tail, rule).items():
                f_loads, f_p99, _ = fixed[path]
                share = (f_loads - loads) / (f_loads - floors[path])
                ok = share >= TARGET and p99 <= f_p99 and not unserved
                met += ok
                cells.append(f"{loads:g} / {p99:.2f} ({100 * share:.0f}%){'*' if ok else ''}")
                if p99 <= f_p99 and share > best[path][0]:
                    best[path] = (share, name)
            print(f"{name}: {met}/{len(args.trace)}  " + "  ".join(cells), flush=True)
    print("best share at no higher p99 than fixed's, per trace:")
    for path, (share, name) in best.items():
        print(f"  {path}: {100 * share:.0f}% ({name})" if name else f"  {path}: none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
