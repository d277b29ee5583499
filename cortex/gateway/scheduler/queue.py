"""Requests waiting at the gateway for a route."""

from __future__ import annotations

import attrs


@attrs.define(eq=False)
class Ticket:
    """One request waiting at the gateway."""

    model_id: str
    #: trio time it arrived.
    arrived: float
    #: Neurons it waits for room on (empty: it waits on a load or a replica).
    wants: frozenset[str] = frozenset()
    #: What for: "room", "slot" (on a loaded replica), "load"; "" at first.
    waiting: str = ""

    def wait_for(self, what: str, wants: frozenset[str] = frozenset()) -> None:
        """It waits for ``what`` now ("room", "slot", "load"), on ``wants`` for room."""
        self.waiting, self.wants = what, wants


@attrs.frozen
class QueueStatistics:
    waiting: int
    by_model: dict[str, int]
    limit: int


@attrs.define(eq=False)
class WaitQueue:
    """Requests waiting at the gateway, a bounded line per model.

    Requests for one model wait together and are served together when the
    model is there; when room frees, the model whose first request has
    waited longest is first to take it (``blocks``).
    """

    limit: int
    lines: dict[str, list[Ticket]] = attrs.field(factory=dict)

    def full(self, model_id: str) -> bool:
        return len(self.lines.get(model_id, ())) >= self.limit

    def enter(self, model_id: str, arrived: float) -> Ticket:
        ticket = Ticket(model_id=model_id, arrived=arrived)
        self.lines.setdefault(model_id, []).append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        line = self.lines.get(ticket.model_id, [])
        if ticket in line:
            line.remove(ticket)
        if not line:
            self.lines.pop(ticket.model_id, None)

    def depth(self, model_id: str | None = None) -> int:
        if model_id is not None:
            return len(self.lines.get(model_id, ()))
        return sum(len(line) for line in self.lines.values())

    def blocks(self, model_id: str, neuron: str, arrived: float) -> bool:
        """Whether another model waited for room on ``neuron`` since before ``arrived``."""
        for other, line in self.lines.items():
            if other == model_id:
                continue
            for ticket in line:
                if neuron in ticket.wants and ticket.arrived < arrived:
                    return True
        return False

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            waiting=self.depth(),
            by_model={m: len(line) for m, line in self.lines.items()},
            limit=self.limit,
        )
