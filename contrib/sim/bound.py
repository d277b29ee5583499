"""The fewest cold loads any router could make on a trace: a clairvoyant lower bound.

``python3 contrib/sim/bound.py --fleet contrib/sim/fleet.toml TRACE.jsonl ...``

Solves offline caching on the trace exactly, as an integer program (HiGHS,
through scipy), in a model kinder than any real fleet:

- the router knows the whole trace in advance (which model comes when);
- the fleet's memory is one pool (no model is too big for a neuron's free
  part, no fragmentation over neurons and GPUs);
- loads and unloads take no time and hold no memory while they run;
- every request is served when it arrives (no slots, no queue).

Variables: for each gap between two requests of one model, whether the model
is unloaded during it (then it is loaded again for the second request: one
cold load). At every request, the models kept must fit beside the one asked
for. Each model's first request is a cold load (the fleet starts empty).

Two variants: ``instant`` needs a model in memory only at the instant of its
requests; ``busy`` also while it generates (prefill + decode at the fleet
file's speeds), as a real neuron does. Both bound routers that serve each
request when it comes (``busy`` the tighter). A router that holds requests
back can load less than that (it turns concurrent sessions into consecutive
ones), but only by making those requests wait: with ``patience`` high,
``python -m cortex.sim`` shows how long.

Needs numpy and scipy (``pip install scipy``); the standard library reads the
files, so cortex need not be importable.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence


def read(fleet_path: str, trace_path: str) -> tuple[dict[str, dict], int, list[dict]]:
    with open(fleet_path, "rb") as f:
        fleet = tomllib.load(f)
    models = {m["id"]: m for m in fleet["models"]}
    memory = sum(sum(n.get("gpus", [])) or n.get("memory_mb", 0) for n in fleet["neurons"])
    with open(trace_path) as f:
        trace = [json.loads(line) for line in f if line.strip()]
    trace.sort(key=lambda r: r["t"])
    return models, memory, trace


def bound(
    models: dict[str, dict], memory: int, trace: list[dict], *, busy: bool, integral: bool = True
) -> float:
    """The fewest cold loads for ``trace`` (the LP relaxation's when not ``integral``)."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import lil_matrix

    size = {m: spec["vram_mb"] for m, spec in models.items()}
    n = len(trace)
    following: list[int | None] = [None] * n
    last: dict[str, int] = {}
    for k, r in enumerate(trace):
        if r["model"] in last:
            following[last[r["model"]]] = k
        last[r["model"]] = k
    ends = []
    for r in trace:
        spec = models[r["model"]]
        prefill = r.get("prompt_tokens", 500) / spec.get("prefill_tokens_per_second", 2000.0)
        decode = r.get("max_tokens", 200) / spec.get("tokens_per_second", 50.0)
        ends.append(r["t"] + (prefill + decode if busy else 0.0))
    column: dict[int, int] = {}  # request index -> variable: unloaded after it
    rows: list[list[tuple[int, int]]] = []
    limits: list[float] = []
    current: dict[str, int] = {}  # model -> its latest request so far
    for k, r in enumerate(trace):
        model, t = r["model"], r["t"]
        held, terms = 0, []
        for other, i in current.items():
            if other == model:
                continue
            if ends[i] > t:
                held += size[other]  # generating: it stays
            elif following[i] is not None:
                terms.append((column.setdefault(i, len(column)), size[other]))
        optional = sum(mb for _, mb in terms)
        over = held + optional - (memory - size[model])
        if over > 0:
            # More in use than fits: a real router waits; here it may drop everything.
            rows.append(terms)
            limits.append(-min(over, optional))
        current[model] = k
    first_loads = len(current)
    if not column:
        return float(first_loads)
    matrix = lil_matrix((max(len(rows), 1), len(column)))
    for row, terms in enumerate(rows):
        for j, mb in terms:
            matrix[row, j] = -mb
    result = linprog(
        np.ones(len(column)),
        A_ub=matrix.tocsr(),
        b_ub=np.array(limits or [0.0]),
        bounds=(0, 1),
        method="highs",
        integrality=np.ones(len(column)) if integral else None,
        options={"time_limit": 300},
    )
    if result.status != 0:
        raise RuntimeError(f"the solver gave up: {result.message}")
    return first_loads + result.fun


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bound.py",
        description="The fewest cold loads a clairvoyant router could make on each trace.",
    )
    parser.add_argument("--fleet", required=True, help="the fleet file (TOML)")
    parser.add_argument("traces", nargs="+", help="traces (JSON lines)")
    args = parser.parse_args(argv)
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("bound.py: needs scipy (pip install scipy)", file=sys.stderr)
        return 1
    print(f"{'trace':40s}  {'requests':>8s}  {'models':>6s}  {'instant':>7s}  {'busy':>6s}")
    for path in args.traces:
        models, memory, trace = read(args.fleet, path)
        instant = bound(models, memory, trace, busy=False)
        held = bound(models, memory, trace, busy=True)
        used = len({r["model"] for r in trace})
        print(f"{path[-40:]:40s}  {len(trace):8d}  {used:6d}  {instant:7.0f}  {held:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
