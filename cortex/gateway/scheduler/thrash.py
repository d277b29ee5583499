"""Evictions, reloads soon after them, and the thrash guard."""

from __future__ import annotations

import math

import attrs


@attrs.define(eq=False)
class ThrashLog:
    """Evictions, so that a reload soon after one counts as thrash, and the guard.

    A model reloaded within ``window`` seconds of its eviction is guarded for
    ``residency`` seconds: the predictive policy does not evict it again in
    that time (requests for others wait instead, and are served together).
    """

    window: float
    residency: float = 0.0
    evicted_at: dict[str, float] = attrs.field(factory=dict)
    guarded_until: dict[str, float] = attrs.field(factory=dict)
    count: int = 0

    def evicted(self, model_id: str, now: float) -> None:
        self.evicted_at[model_id] = now

    def loaded(self, model_id: str, now: float) -> bool:
        """Record a cold load; True when it reloads a model evicted within the window."""
        at = self.evicted_at.pop(model_id, None)
        thrash = at is not None and now - at <= self.window
        if thrash:
            self.count += 1
            self.guarded_until[model_id] = now + self.residency
        return thrash

    def guarded(self, model_id: str, now: float) -> bool:
        return self.guarded_until.get(model_id, -math.inf) > now
