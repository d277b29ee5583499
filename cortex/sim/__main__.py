"""``python -m cortex.sim --fleet FILE --trace FILE [--policy NAME] [--plot FILE.png]``."""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

import attrs

from cortex.config import RoutingSection
from cortex.errors import ConfigError
from cortex.gateway.scheduler import POLICIES
from cortex.sim.fleet import FleetFile
from cortex.sim.replay import RETRIES, read_trace, replay
from cortex.sim.report import plot, table

KEYS = frozenset(f.name for f in attrs.fields(RoutingSection))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cortex.sim",
        description=(
            "Replay a request trace through the gateway's router against fake neurons "
            "in virtual time; print cold loads, evictions, thrash, time to first token "
            "and unserved requests per routing policy."
        ),
    )
    parser.add_argument("--fleet", required=True, help="the fleet file (TOML)")
    parser.add_argument("--trace", required=True, help="the trace (JSON lines)")
    parser.add_argument(
        "--policy",
        action="append",
        choices=POLICIES,
        help="a routing policy to replay (repeat for several; default: all)",
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
        metavar="KEY=VALUE",
        help="also replay the predictive policy with this [routing] key changed (repeatable)",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s"
    )
    try:
        fleet = FleetFile.read(args.fleet)
        trace = read_trace(args.trace)
        routing = dict(_setting(item) for item in args.routing)
        variants = [_setting(item) for item in args.compare]
        for key, value in [*routing.items(), *variants]:
            if key not in KEYS:
                raise ConfigError(f"--routing/--compare: unknown [routing] key {key!r}")
            fleet.gateway_config("predictive", **{**routing, key: value})
    except ConfigError as exc:
        print(f"cortex.sim: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cortex.sim: {exc}", file=sys.stderr)
        return 2
    policies = args.policy or list(POLICIES)
    results = [
        replay(fleet, trace, policy, retries=args.retries, routing=routing) for policy in policies
    ]
    for key, value in variants:
        result = replay(
            fleet, trace, "predictive", retries=args.retries, routing={**routing, key: value}
        )
        result.policy = f"predictive {key}={value}"
        results.append(result)
    print(table(results))
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError:
            print(
                "cortex.sim: --plot needs matplotlib (pip install 'cortex[sim]')", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
