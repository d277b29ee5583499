"""Lower bounds on the cold loads of a trace, as integer programs (HiGHS, through scipy).

``python -m cortex.sim.bound --fleet FLEET.toml TRACE.jsonl ...`` (or
``contrib/sim/bound.py``) prints, per trace:

- ``instant`` (**B**): the fewest cold loads of a router that serves every
  request on arrival, the model resident at that instant; ``busy``: the
  same, resident through its generation. Exact optima (offline caching on
  the trace), but only for routers that never hold a request back: one that
  does (``patience``) can load less, since it turns interleaved sessions of
  two models into consecutive ones.
- ``floor``: a lower bound for *any* router that serves every request within
  ``max_wait`` of its arrival, holding requests back included, as
  ``[lower, upper]``: the solver's proven lower bound and the best schedule
  it found within its time limit (the floor's true value lies between).
  With ``--p99 S``, among schedules that also give 99% of requests their
  first token within S seconds.

Every bound here is kinder than any real fleet: the router knows the whole
trace in advance; the fleet's memory is one pool (no model too big for a
neuron's free part, no fragmentation); loads and unloads take no time and
hold no memory while they run.

The floor's integer program, on a time grid of ``step`` seconds: x[m, g] =
model m is resident at grid instant g; at every instant the resident models
fit in the pool; a load is charged each time x[m, .] turns from 0 to 1 (and
for each model's first residency: the fleet starts empty). Request r (model
m, arriving at a, generating for at least d seconds: its prefill and its
decode at single-sequence speed, the fastest the fake neurons ever go) must
start within [a, a + max_wait] and keep m resident for d, so x[m, g] = 1 at
some instant g in [a, a + max_wait + d] when d >= step. A shorter request
may be served between two instants; it is covered by a residency
u[m, cell] of its own instead, charged a load and no memory. A real
router's schedule gives a solution of this program with no more loads than
it made, so its optimum is a floor. Between two stretches where a model has
requests to serve, keeping it resident or not is one decision (x is equal
across the gap), which changes no optimum and shrinks the program.

Times are the trace's: the bounds are exact for an open-loop replay. In a
closed-loop one a request held back delays the rest of its session; the
bounds then describe the trace as an idle fleet would have sent it.

Needs numpy and scipy >= 1.9 (``pip install scipy``). Reading the files
needs only the standard library; cortex itself need not be importable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

import attrs

#: Seconds a solve of the floor may take by default.
TIME_LIMIT = 60.0
#: Grid step of the floor by default, seconds: on the generator's traces, coarse steps
#: prove more within a time limit than fine ones (whose programs are larger).
STEP = 30.0


def read(fleet_path: str, trace_path: str) -> tuple[dict[str, dict], int, list[dict], float]:
    """(models by id, pooled memory MiB, requests by time, max_wait) from the two files."""
    with open(fleet_path, "rb") as f:
        fleet = tomllib.load(f)
    models = {m["id"]: m for m in fleet["models"]}
    memory = sum(sum(n.get("gpus", [])) or n.get("memory_mb", 0) for n in fleet["neurons"])
    max_wait = float(fleet.get("routing", {}).get("max_wait", 300.0))
    with open(trace_path) as f:
        trace = [json.loads(line) for line in f if line.strip()]
    trace.sort(key=lambda r: r["t"])
    return models, memory, trace, max_wait


def _prefill(models: dict[str, dict], request: dict) -> float:
    spec = models[request["model"]]
    return request.get("prompt_tokens", 500) / spec.get("prefill_tokens_per_second", 2000.0)


def _service(models: dict[str, dict], request: dict) -> float:
    """Seconds of generation at single-sequence speed: the least any request takes."""
    spec = models[request["model"]]
    decode = request.get("max_tokens", 200) / spec.get("tokens_per_second", 50.0)
    return _prefill(models, request) + decode


def bound(
    models: dict[str, dict], memory: int, trace: list[dict], *, busy: bool, integral: bool = True
) -> float:
    """The fewest cold loads of a router that serves every request on arrival.

    ``busy``: the model stays resident through each generation, not only
    at the instant a request arrives. Not ``integral``: the LP relaxation's.
    """
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
    ends = [r["t"] + (_service(models, r) if busy else 0.0) for r in trace]
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


@attrs.frozen
class Floor:
    """The floor's solve: ``lower`` is proven, ``upper`` the best schedule found."""

    lower: float
    upper: float
    #: The solver proved ``upper`` optimal (then ``lower == upper``).
    optimal: bool
    seconds: float
    variables: int


def _window(start: float, end: float, service: float, step: float, count: int) -> tuple[int, int]:
    """The instants (first, last) where a request served within start..end holds its model.

    One that takes a step or more holds the model at an instant between
    start and end. A shorter one may be served by a residency that holds
    no instant there: then it holds the instant just before start or the
    one just after end (or none at all: ``_Cover``'s cells).
    """
    first, last = math.ceil(start / step), math.floor(end / step)
    if service < step:
        first, last = first - 1, last + 1
    return max(first, 0), min(last, count - 1)


class _Cover:
    """The terms that cover one model's request: its instants, or a residency between two."""

    def __init__(self, program: _Program, column: dict[int, int], step: float) -> None:
        self.program = program
        self.column = column
        self.step = step
        #: cell -> a residency of its own between two instants (a load, no memory).
        self.cells: dict[int, int] = {}

    def terms(
        self, first: int, last: int, service: float, start: float, end: float
    ) -> list[tuple[int, float]]:
        """Served at an instant first..last, or (if shorter than a step) in a cell of start..end."""
        terms = [(self.column[g], 1.0) for g in range(first, last + 1) if g in self.column]
        if service < self.step:
            for cell in range(math.floor(start / self.step), math.floor(end / self.step) + 1):
                if cell not in self.cells:
                    self.cells[cell] = self.program.variable(cost=1.0)
                terms.append((self.cells[cell], 1.0))
        return terms


class _Program:
    """The floor's integer program, built column by column (see the module docstring)."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.integer: list[int] = []
        self.upper: list[float] = []
        self.rows: list[list[tuple[int, float]]] = []
        self.low: list[float] = []
        self.high: list[float] = []

    def variable(self, *, cost: float = 0.0, integer: bool = True, upper: float = 1.0) -> int:
        self.cost.append(cost)
        self.integer.append(1 if integer else 0)
        self.upper.append(upper)
        return len(self.cost) - 1

    def row(self, terms: list[tuple[int, float]], low: float, high: float) -> None:
        self.rows.append(terms)
        self.low.append(low)
        self.high.append(high)


def floor(
    models: dict[str, dict],
    memory: int,
    trace: list[dict],
    *,
    max_wait: float,
    p99: float | None = None,
    step: float = STEP,
    time_limit: float = TIME_LIMIT,
) -> Floor:
    """A floor on the cold loads of any router serving ``trace`` within ``max_wait``.

    ``p99``: also give 99% of requests (nearest rank) their first token
    within that many seconds. The solve stops after ``time_limit`` seconds
    with what it has proven.

    Raises:
      RuntimeError: the solver found no schedule and proved nothing.
    """
    import numpy as np
    from scipy.optimize import Bounds as Box
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if not trace:
        return Floor(0.0, 0.0, True, 0.0, 0)
    program = _Program()
    size = {m: spec["vram_mb"] for m, spec in models.items()}
    by_model: dict[str, list[dict]] = {}
    for r in trace:
        by_model.setdefault(r["model"], []).append(r)
    longest = max(_service(models, r) for r in trace)
    instants = math.ceil((trace[-1]["t"] + max_wait + longest) / step) + 1
    # grid instant -> [(variable, MiB)] of the models that may be resident then.
    resident: list[list[tuple[int, float]]] = [[] for _ in range(instants)]
    fast: list[int] = []  # p99: one binary per request, 1 = first token in time
    for model, requests in by_model.items():
        spans = []
        for r in requests:
            d = _service(models, r)
            first, last = _window(r["t"], r["t"] + max_wait + d, d, step, instants)
            spans.append((first, last, r, d))
        # The instants where the model has a request to serve, and the gaps.
        needed = sorted({g for first, last, _, _ in spans for g in range(first, last + 1)})
        column: dict[int, int] = {}
        sequence: list[int] = []
        for n, g in enumerate(needed):
            if n and g > needed[n - 1] + 1:
                gap = program.variable()
                sequence.append(gap)
                for h in range(needed[n - 1] + 1, g):
                    resident[h].append((gap, size[model]))
            column[g] = program.variable()
            sequence.append(column[g])
            resident[g].append((column[g], size[model]))
        previous = None
        for var in sequence:
            load = program.variable(cost=1.0, integer=False)
            terms = [(load, 1.0), (var, -1.0)]
            if previous is not None:
                terms.append((previous, 1.0))
            program.row(terms, 0.0, math.inf)  # load >= x[g] - x[g-1]
            previous = var
        cover = _Cover(program, column, step)
        for first, last, r, d in spans:
            terms = cover.terms(first, last, d, r["t"], r["t"] + max_wait + d)
            program.row(terms, 1.0, math.inf)
            if p99 is None:
                continue
            in_time = program.variable()
            fast.append(in_time)
            slack = p99 - _prefill(models, r)
            if slack < 0:
                program.row([(in_time, 1.0)], 0.0, 0.0)
                continue
            end = r["t"] + slack + d
            terms = cover.terms(*_window(r["t"], end, d, step, instants), d, r["t"], end)
            program.row([*terms, (in_time, -1.0)], 0.0, math.inf)
    for terms in resident:
        if sum(mb for _, mb in terms) > memory:
            program.row(terms, -math.inf, float(memory))
    if p99 is not None:
        late = len(trace) - math.ceil(0.99 * len(trace))
        program.row([(v, 1.0) for v in fast], len(trace) - late, math.inf)
    rows, cols, values = [], [], []
    for i, terms in enumerate(program.rows):
        for j, v in terms:
            rows.append(i)
            cols.append(j)
            values.append(v)
    count = len(program.cost)
    matrix = coo_matrix((values, (rows, cols)), shape=(len(program.rows), count)).tocsr()
    started = time.monotonic()
    result = milp(
        np.array(program.cost),
        integrality=np.array(program.integer),
        bounds=Box(np.zeros(count), np.array(program.upper)),
        constraints=LinearConstraint(matrix, np.array(program.low), np.array(program.high)),
        options={"time_limit": time_limit, "disp": False},
    )
    seconds = time.monotonic() - started
    dual = getattr(result, "mip_dual_bound", None)
    if result.x is None and dual is None:
        raise RuntimeError(f"the solver gave up: {result.message}")
    upper = float(round(result.fun)) if result.x is not None else math.inf
    # Loads come in whole numbers: a proven 47.2 means 48.
    lower = float(math.ceil(dual - 1e-6)) if dual is not None and math.isfinite(dual) else 0.0
    optimal = result.status == 0
    if optimal:
        lower = upper
    return Floor(min(lower, upper), upper, optimal, seconds, count)


def inputs(fleet: Any, trace: Sequence[Any]) -> tuple[dict[str, dict], int, list[dict]]:
    """The bounds' inputs from a ``cortex.sim.fleet.FleetFile`` and ``TraceRequest`` s."""
    models = {
        m.id: {
            "vram_mb": m.vram_mb,
            "tokens_per_second": m.tokens_per_second,
            "prefill_tokens_per_second": m.prefill_tokens_per_second,
        }
        for m in fleet.models
    }
    requests = [
        {"t": r.t, "model": r.model, "prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens}
        for r in trace
    ]
    return models, fleet.memory_mb, requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cortex.sim.bound",
        description=(
            "Lower bounds on a trace's cold loads: the optimum of a router that serves "
            "every request on arrival, and a floor for any router within max_wait."
        ),
    )
    parser.add_argument("--fleet", required=True, help="the fleet file (TOML)")
    parser.add_argument("traces", nargs="+", help="traces (JSON lines)")
    parser.add_argument(
        "--max-wait", type=float, help="seconds (default: the fleet file's, else 300)"
    )
    parser.add_argument(
        "--p99", type=float, help="also bound schedules with p99 time to first token <= this"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=TIME_LIMIT,
        help="seconds for each floor's solve (default %(default)s)",
    )
    parser.add_argument(
        "--step", type=float, default=STEP, help="the floor's grid, s (default %(default)s)"
    )
    parser.add_argument("--no-floor", action="store_true", help="only the on-arrival optima")
    args = parser.parse_args(argv)
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("bound: needs scipy (pip install scipy)", file=sys.stderr)
        return 1
    head = f"{'trace':32s}  {'requests':>8s}  {'models':>6s}  {'B instant':>9s}  {'busy':>5s}"
    if not args.no_floor:
        head += f"  {'floor':>12s}"
        if args.p99 is not None:
            head += f"  {f'floor p99<={args.p99:g}':>16s}"
    print(head)
    for path in args.traces:
        models, memory, trace, max_wait = read(args.fleet, path)
        if args.max_wait is not None:
            max_wait = args.max_wait
        instant = bound(models, memory, trace, busy=False)
        held = bound(models, memory, trace, busy=True)
        used = len({r["model"] for r in trace})
        line = f"{path[-32:]:32s}  {len(trace):8d}  {used:6d}  {instant:9.0f}  {held:5.0f}"
        if not args.no_floor:
            for p99 in [None] if args.p99 is None else [None, args.p99]:
                found = floor(
                    models,
                    memory,
                    trace,
                    max_wait=max_wait,
                    p99=p99,
                    step=args.step,
                    time_limit=args.time_limit,
                )
                cell = (
                    f"{found.lower:g}" if found.optimal else f"[{found.lower:g}, {found.upper:g}]"
                )
                line += f"  {cell:>12s}" if p99 is None else f"  {cell:>16s}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
