"""``cortex status``: print the fleet as a gateway sees it.

Asks the gateway's ``GET /fleet`` and prints tables (or the JSON with
``--json``). Exit status: 0 when the gateway answered (also when the
reader of the output stops early, as ``| head`` does), 1 when it is
unreachable or answered with an error, with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "-"
    seconds = max(0, now - then)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _table(headers: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1024:.1f}G" if value >= 1024 else f"{value}M"


def render(fleet: dict[str, Any], *, now: float | None = None) -> str:
    """The human tables for a ``/fleet`` document."""
    now = time.time() if now is None else now
    out = []
    rows = []
    for n in fleet["neurons"]:
        state = (
            "down"
            if not n["up"]
            # .get: a gateway older than the field.
            else "draining"
            if n.get("draining")
            else "suspect"
            if n["suspect"]
            else "up"
        )
        if n["devices"] is None:
            devices = "-"  # never reached: nothing known
        elif n["devices"]:
            devices = ", ".join(
                f"{d['index']}:{d['name']} {_mb(d['vram_used_mb'])}/{_mb(d['vram_total_mb'])}"
                f" {d['utilization_pct'] if d['utilization_pct'] is not None else '?'}%"
                for d in n["devices"]
            )
        else:
            devices = "cpu"
        memory = n["memory"]
        used_free = (
            f"{_mb(memory['used_mb'])} used, {_mb(memory['free_mb'])} free" if memory else "-"
        )
        rows.append(
            [
                n["name"],
                state,
                n["endpoint"],
                devices,
                used_free,
                "-" if n["in_flight"] is None else str(n["in_flight"]),
                _ago(n["last_seen"], now),
            ]
        )
    out.append("NEURONS")
    out.append(
        _table(["name", "state", "endpoint", "devices", "memory", "in flight", "last seen"], rows)
    )
    for n in fleet["neurons"]:
        if n["error"] and not (n["up"] and not n["suspect"]):
            out.append(f"  {n['name']}: {n['error']}")
    rows = []
    for m in fleet["models"]:
        where = (
            ", ".join(f"{loc['neuron']} ({loc['status']})" for loc in m["locations"])
            or "not loaded"
        )
        in_flight = sum(loc["in_flight"] for loc in m["locations"])
        last_used = max((loc["last_used"] or 0 for loc in m["locations"]), default=0)
        # .get: a gateway older than the field.
        name = f"{m['id']} (retired)" if m.get("retired") else m["id"]
        rows.append(
            [name, where, ", ".join(m["pinned_on"]) or "-", str(in_flight), _ago(last_used, now)]
        )
    out.append("")
    out.append("MODELS")
    out.append(_table(["model", "where", "pinned on", "in flight", "last used"], rows))
    # Why a model cannot be served: its catalogue entry (refused by a neuron,
    # until a reload, or fitting on no neuron), or a neuron's last failure to load it.
    for m in fleet["models"]:
        if m.get("error"):
            out.append(f"  {m['id']}: {m['error']}")
        for loc in m["locations"]:
            if loc.get("error"):
                out.append(f"  {m['id']} on {loc['neuron']}: {loc['error']}")
            if loc["status"] == "stalled":
                out.append(
                    f"  {m['id']} on {loc['neuron']}: no progress for "
                    f"{loc.get('stalled_secs', 0):.0f} s with requests running"
                )
    # Tiers are aliases too (models.toml's [aliases]): one table, a tier's
    # members in the router's order of preference.
    aliases = [[alias, model] for alias, model in fleet["aliases"].items()]
    aliases += [
        [tier, "tier: " + ", ".join(members)] for tier, members in fleet.get("tiers", {}).items()
    ]
    if aliases:
        out.append("")
        out.append("ALIASES")
        out.append(_table(["alias", "model"], sorted(aliases)))
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    url = args.gateway.rstrip("/") + "/fleet"
    key = args.api_key or os.environ.get("CORTEX_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"cortex: cannot reach the gateway at {args.gateway}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.reason_phrase
        print(
            f"cortex: the gateway at {args.gateway} answered {response.status_code}: {message}",
            file=sys.stderr,
        )
        return 1
    fleet = response.json()
    try:
        print(json.dumps(fleet, indent=2) if args.json else render(fleet), flush=True)
    except BrokenPipeError:
        # The reader stopped early (cortex status | head): what it wanted, it
        # has. Point stdout at /dev/null so the flush at exit fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
