"""The replay's output: a table per policy, and a plot over time (matplotlib optional)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import attrs

from cortex.sim.replay import Result


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@attrs.frozen
class Row:
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

    @classmethod
    def of(cls, result: Result) -> Row:
        ttfts = [o.ttft for o in result.served if o.ttft is not None]
        waits = [o.wait for o in result.served if o.wait is not None]
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
        )


HEADERS = (
    "policy",
    "requests",
    "cold loads",
    "evictions",
    "thrash",
    "TTFT p50 s",
    "TTFT p99 s",
    "TTFT max s",
    "wait max s",
    "unserved",
)


def table(results: Sequence[Result]) -> str:
    """A plain-text table, one row per policy, first row the header."""
    rows = [HEADERS]
    for result in results:
        row = Row.of(result)
        rows.append(
            (
                row.policy,
                str(row.requests),
                str(row.cold_loads),
                str(row.evictions),
                str(row.thrash),
                f"{row.ttft_p50:.2f}",
                f"{row.ttft_p99:.2f}",
                f"{row.ttft_max:.2f}",
                f"{row.wait_max:.2f}",
                str(row.unserved),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
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
    """Queue depth and models loaded over time, one line per policy, as a PNG.

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
