"""The replay's output: a table per configuration, and a plot over time (matplotlib optional).

Requests never served count as an infinite time to first token: a policy
that drops 2% of its requests has an infinite p99, not a good one. With
several replays of a configuration (different seeds) each figure is their
median, and cold loads and p99 also show their range.

With the bounds of :mod:`cortex.sim.bound`, the table ends with two rows
and each configuration's cold loads are also shown as the share of the way
it went from ``fixed``'s to each bound: ``to B``, the optimum of a router
that serves every request on arrival, and ``to floor``, the proven floor of
any router that serves every request within ``max_wait``.

A trace with agent sessions (``python -m cortex.sim.trace --agents N``)
gets a second table (:func:`sessions_table`): per configuration, the share
of the prompt tokens read from a prompt cache (and, for later turns, from a
host tier) and the time to first token
of first turns against later ones, later turns that did not find their
whole previous conversation cached, the router's affinity kept / broken /
new, the cached tokens that unloads threw away, the unloads of the agents'
models, what became of the follow-ups of answers that called a tool (kept:
their result came within the window to the model still loaded; evicted:
within it, the model gone; late; expired: none came), and the p99 of the
other requests (the ordinary traffic's).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence

import attrs

from cortex.sim.replay import Outcome, Result


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@attrs.frozen
class Row:
    """One replay's figures."""

    policy: str
    requests: int
    cold_loads: int
    evictions: int
    thrash: int
    ttft_p50: float
    ttft_p99: float
    ttft_max: float
    wait_max: float
    unserved: int
    #: Served, but after waiting longer than max_wait.
    late: int = 0
    #: Loads a neuron refused for want of memory.
    refused: int = 0
    #: Agent sessions and their turns (the rest: nan without any).
    agents: int = 0
    turns: int = 0
    #: Share of prompt tokens read from cache, first turns and later turns.
    cached_first: float = math.nan
    cached_later: float = math.nan
    #: ... of later turns' prompt tokens, the share restored from a host tier.
    restored_later: float = math.nan
    ttft_first_p50: float = math.nan
    ttft_later_p50: float = math.nan
    ttft_later_p99: float = math.nan
    #: Later turns served without their whole previous conversation cached.
    missed: int = 0
    kept: int = 0
    broken: int = 0
    new: int = 0
    #: Cached prompt tokens that unloads threw away.
    dropped_tokens: int = 0
    #: Time to first token p99 of the requests that are not agent turns.
    others_p99: float = math.nan
    #: Unloads of the agents' models.
    agent_unloads: int = 0
    #: Follow-ups of answers that called a tool: kept, evicted, late, expired.
    follow_ups_kept: int = 0
    follow_ups_evicted: int = 0
    follow_ups_late: int = 0
    follow_ups_expired: int = 0

    @property
    def later_over_first(self) -> float:
        """Median time to first token of later turns over first turns'."""
        if not self.ttft_first_p50 or math.isnan(self.ttft_first_p50):
            return math.nan
        return self.ttft_later_p50 / self.ttft_first_p50

    @classmethod
    def of(cls, result: Result) -> Row:
        ttfts = result.ttfts()
        waits = [o.wait for o in result.served if o.wait is not None]
        turns = [o for o in result.outcomes if o.request.agent]
        first = [o for o in turns if o.turn == 0]
        later = [o for o in turns if o.turn > 0]
        return cls(
            policy=result.policy,
            requests=len(result.outcomes),
            cold_loads=result.cold_loads,
            evictions=result.evictions,
            thrash=result.thrash,
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            ttft_max=max(ttfts, default=math.nan),
            wait_max=max(waits, default=math.nan),
            unserved=result.unserved,
            late=result.late,
            refused=result.refused,
            agents=len(first),
            turns=len(turns),
            cached_first=cached_share(first),
            cached_later=cached_share(later),
            restored_later=cached_share(later, restored=True),
            ttft_first_p50=percentile(_ttfts(first), 50),
            ttft_later_p50=percentile(_ttfts(later), 50),
            ttft_later_p99=percentile(_ttfts(later), 99),
            missed=sum(1 for o in later if o.ttft is not None and o.cached < _previous(o)),
            kept=result.affinity.get("kept", 0),
            broken=result.affinity.get("broken", 0),
            new=result.affinity.get("new", 0),
            dropped_tokens=result.dropped_tokens,
            others_p99=percentile(_ttfts([o for o in result.outcomes if not o.request.agent]), 99),
            agent_unloads=result.agent_unloads,
            follow_ups_kept=result.follow_ups.get("kept", 0),
            follow_ups_evicted=result.follow_ups.get("evicted", 0),
            follow_ups_late=result.follow_ups.get("late", 0),
            follow_ups_expired=result.follow_ups.get("expired", 0),
        )


def _ttfts(outcomes: Sequence[Outcome]) -> list[float]:
    return [math.inf if o.ttft is None else o.ttft for o in outcomes]


def _previous(outcome: Outcome) -> int:
    """Tokens of an agent turn's prompt that its session sent before (all but the new message)."""
    request = outcome.request
    return request.prompt_tokens - request.prompt[-1][1]


def cached_share(outcomes: Sequence[Outcome], *, restored: bool = False) -> float:
    """Prompt tokens read from cache (``restored``: from a host tier) over
    prompt tokens, of the served ``outcomes``."""
    served = [o for o in outcomes if o.ttft is not None]
    total = sum(o.request.prompt_tokens for o in served)
    read = sum(o.restored if restored else o.cached for o in served)
    return read / total if total else math.nan


@attrs.frozen
class Summary:
    """One configuration over one or more replays (seeds)."""

    policy: str
    rows: tuple[Row, ...]

    @classmethod
    def of(cls, results: Sequence[Result]) -> Summary:
        return cls(policy=results[0].policy, rows=tuple(Row.of(r) for r in results))

    def median(self, name: str) -> float:
        return statistics.median(getattr(row, name) for row in self.rows)

    def spread(self, name: str) -> tuple[float, float]:
        values = [getattr(row, name) for row in self.rows]
        return min(values), max(values)


def summarise(results: Sequence[Result]) -> list[Summary]:
    """Results grouped by configuration (``policy``), in order of first appearance."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.policy, []).append(result)
    return [Summary.of(group) for group in groups.values()]


@attrs.frozen
class Bounds:
    """What :mod:`cortex.sim.bound` found for the trace (None: not computed)."""

    #: Fewest cold loads of a router that serves every request on arrival.
    instant: float | None = None
    #: [proven lower bound, best schedule found] on the cold loads of any
    #: router that serves every request within ``max_wait``.
    floor: tuple[float, float] | None = None
    max_wait: float = 300.0


HEADERS = (
    "policy",
    "requests",
    "cold loads",
    "to B",
    "to floor",
    "evictions",
    "thrash",
    "TTFT p50 s",
    "TTFT p99 s",
    "TTFT max s",
    "wait max s",
    "unserved",
    "late",
    "refused",
)


def _seconds(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _share(fixed: float | None, value: float, bound: float | None) -> str:
    """How far ``value`` went from ``fixed`` towards ``bound``, in per cent."""
    if fixed is None or bound is None or fixed <= bound:
        return ""
    return f"{100 * (fixed - value) / (fixed - bound):.0f}%"


def table(results: Sequence[Result | Summary], bounds: Bounds | None = None) -> str:
    """A plain-text table, one row per configuration, first row the header."""
    summaries = [r for r in results if isinstance(r, Summary)]
    summaries += summarise([r for r in results if isinstance(r, Result)])
    bounds = bounds or Bounds()
    fixed = next((s.median("cold_loads") for s in summaries if s.policy == "fixed"), None)
    floor = bounds.floor[0] if bounds.floor is not None else None
    rows = [HEADERS]
    for summary in summaries:
        loads = summary.median("cold_loads")
        p99 = summary.median("ttft_p99")
        loads_cell, p99_cell = f"{loads:g}", _seconds(p99)
        if len(summary.rows) > 1:
            low, high = summary.spread("cold_loads")
            loads_cell += f" ({low:g}-{high:g})"
            low, high = summary.spread("ttft_p99")
            p99_cell += f" ({_seconds(low)}-{_seconds(high)})"
        rows.append(
            (
                summary.policy,
                f"{summary.median('requests'):g}",
                loads_cell,
                _share(fixed, loads, bounds.instant),
                _share(fixed, loads, floor),
                f"{summary.median('evictions'):g}",
                f"{summary.median('thrash'):g}",
                _seconds(summary.median("ttft_p50")),
                p99_cell,
                _seconds(summary.median("ttft_max")),
                _seconds(summary.median("wait_max")),
                f"{summary.median('unserved'):g}",
                f"{summary.median('late'):g}",
                f"{summary.median('refused'):g}",
            )
        )
    blank = ("",) * (len(HEADERS) - 3)
    if bounds.instant is not None:
        rows.append(("B: serves on arrival", "", f"{bounds.instant:g}", *blank))
    if bounds.floor is not None:
        low, high = bounds.floor
        cell = f"{low:g}" if low == high else f"[{low:g}, {high:g}]"
        rows.append((f"floor: waits <= {bounds.max_wait:g} s", "", cell, *blank))
    return _layout(rows)


SESSION_HEADERS = (
    "policy",
    "sessions",
    "turns",
    "cached 1st",
    "cached later",
    "from host",
    "TTFT 1st p50 s",
    "later p50 s",
    "later/1st",
    "later p99 s",
    "later missed",
    "kept",
    "broken",
    "new",
    "dropped tokens",
    "agent unloads",
    "follow-ups kept/evicted/late/expired",
    "others p99 s",
)


def _percent(value: float) -> str:
    return "" if math.isnan(value) else f"{100 * value:.0f}%"


def sessions_table(results: Sequence[Result | Summary]) -> str:
    """The agent sessions' figures, one row per configuration (medians over replays)."""
    summaries = [r for r in results if isinstance(r, Summary)]
    summaries += summarise([r for r in results if isinstance(r, Result)])
    rows = [SESSION_HEADERS]
    for summary in summaries:
        ratio = statistics.median(row.later_over_first for row in summary.rows)
        rows.append(
            (
                summary.policy,
                f"{summary.median('agents'):g}",
                f"{summary.median('turns'):g}",
                _percent(summary.median("cached_first")),
                _percent(summary.median("cached_later")),
                _percent(summary.median("restored_later")),
                _seconds(summary.median("ttft_first_p50")),
                _seconds(summary.median("ttft_later_p50")),
                "" if math.isnan(ratio) else f"{ratio:.2f}",
                _seconds(summary.median("ttft_later_p99")),
                f"{summary.median('missed'):g}",
                f"{summary.median('kept'):g}",
                f"{summary.median('broken'):g}",
                f"{summary.median('new'):g}",
                f"{summary.median('dropped_tokens'):.0f}",
                f"{summary.median('agent_unloads'):g}",
                "/".join(
                    f"{summary.median('follow_ups_' + result):g}"
                    for result in ("kept", "evicted", "late", "expired")
                ),
                _seconds(summary.median("others_p99")),
            )
        )
    return _layout(rows)


def _layout(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str | os.PathLike[str]) -> None:
    """Queue depth and models loaded over time, one line per replay, as a PNG.

    Raises:
      ImportError: matplotlib is not installed (``pip install cortex[sim]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (waiting, loaded) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for result in results:
        minutes = [s.t / 60 for s in result.samples]
        waiting.plot(minutes, [s.waiting for s in result.samples], label=result.policy, lw=1)
        loaded.plot(minutes, [s.loaded for s in result.samples], label=result.policy, lw=1)
    waiting.set_ylabel("requests waiting")
    loaded.set_ylabel("models loaded")
    loaded.set_xlabel("minutes")
    waiting.legend(loc="upper right")
    waiting.set_title("cortex sim: queue depth and loaded models over time")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
