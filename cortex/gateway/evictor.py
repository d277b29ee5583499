"""Choosing what to unload so that a model fits on a neuron.

Pure planning over ``FleetState``; the loader carries the plan out
(``cortex.gateway.loader``: its load task unloads the victims, then
loads). A model is a candidate only when it is loaded, this gateway's
(in its catalogue, or once in it and retired by a reload; one it never
had, such as a model a neuron loaded at its start or another gateway's,
is as good as pinned), not pinned on that neuron, has nothing in
flight or queued (this gateway's count and the neuron's), and is not
already being evicted.
The routing policy may spare more (the thrash guard) and order the
candidates its own way (``key``); the default order is the ``strategy``'s.
Retired models go first whatever the order: nothing here loads them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs

from cortex.config import CatalogModel
from cortex.gateway.state import (
    LOADED,
    FleetState,
    NeuronState,
    capacity,
    model_memory,
    place,
)

Strategy = Literal["lru", "priority"]


@attrs.frozen
class Plan:
    """Load on ``devices`` (``[]``: CPU host) after unloading ``evictions`` in order."""

    devices: list[int]
    evictions: list[str]


#: Sort key of eviction candidates (model id -> key), first victim first.
VictimKey = Callable[[str], Any]
#: True for a model the policy does not let go now.
Spare = Callable[[str], bool]


def candidates(
    state: FleetState,
    neuron: NeuronState,
    strategy: Strategy,
    *,
    key: VictimKey | None = None,
    spare: Spare | None = None,
) -> list[str]:
    """Models on ``neuron`` that may be evicted, first victim first."""
    pending = {model_id for (name, model_id) in state.pending if name == neuron.name}
    found = []
    for model_id, status in neuron.models.items():
        if (
            status.status != LOADED
            or model_id in neuron.evicting
            or model_id in pending
            or neuron.busy(model_id)
            or not _ours(state, model_id)
            or state.pinned(neuron, model_id)
            or (spare is not None and spare(model_id))
        ):
            continue
        found.append(model_id)

    def order(model_id: str) -> tuple[int, float]:
        entry = state.catalogue.models.get(model_id)
        priority = entry.priority if entry is not None and strategy == "priority" else 0
        return priority, neuron.recency(model_id)

    rank = key or order
    return sorted(found, key=lambda model_id: (not state.retired(model_id), rank(model_id)))


def _ours(state: FleetState, model_id: str) -> bool:
    """In this gateway's catalogue, now or before a reload retired it."""
    return model_id in state.catalogue.models or state.retired(model_id)


def plan(
    state: FleetState,
    neuron: NeuronState,
    model: CatalogModel,
    strategy: Strategy,
    *,
    key: VictimKey | None = None,
    spare: Spare | None = None,
) -> Plan | None:
    """How to fit ``model`` on ``neuron``, evicting as little as the order allows.

    Returns None when it cannot fit there now, even after evicting every
    candidate (or when the neuron's memory is not known yet).
    """
    free = state.free_memory(neuron)
    if free is None:
        return None
    devices = place(model, free)
    if devices is not None:
        return Plan(devices=devices, evictions=[])
    gpu = neuron.is_gpu
    victims: list[str] = []
    for model_id in candidates(state, neuron, strategy, key=key, spare=spare):
        victims.append(model_id)
        _add(free, model_memory(neuron.models[model_id], gpu))
        devices = place(model, free)
        if devices is not None:
            break
    else:
        return None
    # On a GPU host an early victim may sit on a device the placement does
    # not use: keep only the victims the fit needs, sparing the most recent.
    for model_id in reversed(victims[:-1]):
        trial = dict(free)
        _add(trial, model_memory(neuron.models[model_id], gpu), sign=-1)
        if place(model, trial) is not None:
            victims.remove(model_id)
            free = trial
    devices = place(model, free)
    assert devices is not None
    return Plan(devices=devices, evictions=victims)


@attrs.frozen
class Room:
    """What ``neuron`` would have free once every model that may ever be evicted there is gone."""

    #: Free memory per device index (or HOST) then.
    free: dict[int, int]
    #: The models that stay: pinned there.
    pinned: list[str]
    #: The models that stay: not this gateway's to load back (``_ours``).
    foreign: list[str]


def room_later(state: FleetState, neuron: NeuronState) -> Room | None:
    """The room on ``neuron`` once every evictable model there is gone; None: memory unknown."""
    total = capacity(neuron)
    if total is None:
        return None
    room = Room(free=dict(total), pinned=[], foreign=[])
    gpu = neuron.is_gpu
    for model_id, status in neuron.models.items():
        if not _ours(state, model_id):
            room.foreign.append(model_id)
        elif state.pinned(neuron, model_id):
            room.pinned.append(model_id)
        else:
            continue
        _add(room.free, model_memory(status, gpu), sign=-1)
    return room


def fits_later(state: FleetState, neuron: NeuronState, model: CatalogModel) -> bool:
    """Whether ``model`` would fit on ``neuron`` once every evictable model there is gone.

    True means waiting can help: what blocks the load now (requests in
    flight, loads under way, the thrash guard) ends by itself.
    """
    room = room_later(state, neuron)
    return room is not None and place(model, room.free) is not None


def _add(free: dict[int, int], memory: dict[int, int], sign: int = 1) -> None:
    for index, mb in memory.items():
        if index in free:
            free[index] += sign * mb
