"""Preloading pinned models: a model pinned on a neuron is kept loaded there.

A catalogue model whose ``pinned_on`` names a neuron is loaded there
whenever that neuron is routable and neither has it loaded or loading nor
has a load of it from this gateway under way: at start (the first poll),
when the neuron comes back after being down or has restarted (its poll no
longer lists the model), and after a reload adds the pin. ``[routing]
preload_pinned = false`` turns this off.

A preload is an ordinary load of the ``Loader`` (one per (neuron, model),
in the fleet state from the moment it starts, logged and counted as any
cold load), so a request for the model meanwhile joins it as it joins any
load in progress, rather than loading the model elsewhere. It goes only
into free memory: a pin says where a model matters, not that it matters
more than what is serving requests there, so a preload evicts nothing. A
model that does not fit is logged at warning once, and loaded as soon as a
poll, an unload or a finished load shows the room (a request for it may
still evict for it, as before).

Whether it fits is judged with what that neuron said of the model
(``FleetState.sized``): its size loaded there before, or what a refusal
there said it needs. Where the neuron has said nothing yet, only another
neuron's size or the catalogue's ``vram_mb`` would judge it, and those may
be wrong for this neuron (another KV cache layout, another engine), so a
model that does not fit by them is asked for all the same: the neuron loads
it, or refuses it saying what it needs there. A refusal for want of memory
is no failure to back off from but a wait for room: the model is asked for
again only once the neuron has more memory free than it had then, so a
neuron is asked at most once per change of its free memory.

A preload that fails is tried again after a back-off that doubles from
``BACKOFF_FIRST`` to ``BACKOFF_LIMIT`` seconds, so a file that cannot load
does not make the neuron load it again at every poll; a load that succeeds
there, or a reload (a new catalogue entry), starts afresh. One the neuron
refused as a bad request marks the entry invalid (``FleetState.invalid``),
and like requests the preloader leaves it alone until a reload.

:meth:`Preloader.check` decides and starts with no ``await``: the
``Preloader.run`` task calls it whenever the fleet state changes (a poll, a
load or unload ending, a reload) or a back-off ends, and the router calls
it before each decision, so a request that arrives as a pinned neuron
comes up finds the preload in progress and waits on it.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from cortex.config import CatalogModel, GatewayConfig
from cortex.errors import InsufficientMemory
from cortex.gateway.evictor import Plan
from cortex.gateway.loader import Loader
from cortex.gateway.scheduler import Decision
from cortex.gateway.scheduler.predictor import Option
from cortex.gateway.state import (
    HOST,
    LOADED,
    FleetState,
    NeuronState,
    PendingLoad,
    feasible,
    place,
)

log = logging.getLogger(__name__)

#: Seconds before a failed preload is tried again the first time ...
BACKOFF_FIRST = 1.0
#: ... doubling with each failure in a row, up to this.
BACKOFF_LIMIT = 300.0


@attrs.define
class _Failures:
    """Preloads of one (neuron, model) that failed in a row."""

    #: The catalogue entry they failed with: a reload makes a new one.
    entry: CatalogModel
    count: int
    #: trio time before which it is not tried again.
    retry_at: float


@attrs.frozen
class PreloadStatistics:
    """What the preloader holds now (``Preloader.statistics``)."""

    #: Preloads started and not yet seen ending.
    in_progress: int
    #: (neuron, model) pairs backing off after failed preloads.
    backing_off: int
    #: (neuron, model) pairs waiting for room.
    waiting_for_room: int


@attrs.define(eq=False)
class Preloader:
    """Loads pinned models on the neurons they are pinned on, through ``loader``."""

    config: GatewayConfig
    state: FleetState
    loader: Loader
    #: (neuron, model) -> a preload started and not yet seen ending.
    _loads: dict[tuple[str, str], PendingLoad] = attrs.field(factory=dict, init=False)
    _failures: dict[tuple[str, str], _Failures] = attrs.field(factory=dict, init=False)
    #: (neuron, model) pairs logged as not fitting, until they are preloaded.
    _short: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    #: (neuron, model) -> (the catalogue entry, MiB free there) when the
    #: neuron last refused a preload for want of memory: not asked again
    #: until more is free.
    _refused: dict[tuple[str, str], tuple[CatalogModel, int]] = attrs.field(
        factory=dict, init=False
    )

    @property
    def enabled(self) -> bool:
        return self.config.routing.preload_pinned

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Preload whatever is due whenever the fleet changes, until cancelled.

        Start it after ``Loader.run`` (the loads run there). Returns at once
        when ``preload_pinned`` is off.
        """
        task_status.started()
        if not self.enabled:
            return
        while True:
            self.check()
            with trio.move_on_at(self._next_retry(trio.current_time())):
                await self.state.wait_changed()

    def check(self) -> list[PendingLoad]:
        """Start the preloads due now and return them (no await in here).

        Raises:
          RuntimeError: ``Loader.run`` is not running.
        """
        if not self.enabled:
            return []
        now = trio.current_time()
        self._settle(now)
        started = []
        for model in list(self.state.catalogue.models.values()):
            for name in model.pinned_on:
                neuron = self.state.neurons.get(name)
                if neuron is not None:
                    load = self._preload(neuron, model, now)
                    if load is not None:
                        started.append(load)
        if started:
            # Requests waiting for room for these models join the loads.
            self.state.changed()
        return started

    def statistics(self) -> PreloadStatistics:
        return PreloadStatistics(
            in_progress=len(self._loads),
            backing_off=len(self._failures),
            waiting_for_room=len(self._short | self._refused.keys()),
        )

    def _settle(self, now: float) -> None:
        """Record how the preloads that ended went."""
        for key, load in list(self._loads.items()):
            if not load.done.is_set():
                continue
            del self._loads[key]
            if load.error is None:
                self._failures.pop(key, None)
                self._refused.pop(key, None)
                continue
            entry = self.state.catalogue.models.get(load.model_id)
            if entry is None:
                continue  # a reload took it out
            if isinstance(load.error, InsufficientMemory):
                neuron = self.state.neurons[load.neuron]
                free = self.state.free_memory(neuron) or {}
                self._refused[key] = (entry, sum(free.values()))
                continue
            if self.state.invalid(load.model_id) is not None:
                log.warning(
                    "not preloading %s on %s again until a reload: its entry is invalid",
                    load.model_id,
                    load.neuron,
                )
                continue
            failures = self._failures.get(key)
            count = failures.count + 1 if failures is not None and failures.entry is entry else 1
            delay = min(BACKOFF_LIMIT, BACKOFF_FIRST * 2 ** (count - 1))
            self._failures[key] = _Failures(entry, count, now + delay)
            log.warning(
                "preloading %s on %s failed (%d in a row): trying again in %g s",
                load.model_id,
                load.neuron,
                count,
                delay,
            )

    def _preload(self, neuron: NeuronState, model: CatalogModel, now: float) -> PendingLoad | None:
        """Start the preload of ``model`` on ``neuron`` if it is due and fits; else None."""
        key = (neuron.name, model.id)
        if self.state.holds(neuron, model.id):
            self._short.discard(key)
            self._refused.pop(key, None)
            if neuron.status_of(model.id) == LOADED:
                self._failures.pop(key, None)  # loaded there, whoever loaded it
            return None
        if (
            not neuron.routable
            or neuron.discovery is None
            or neuron.health is None
            or self.state.invalid(model.id) is not None
        ):
            return None
        failures = self._failures.get(key)
        if failures is not None:
            if failures.entry is not model:
                del self._failures[key]  # a reload: start afresh
            elif now < failures.retry_at:
                return None
        entry = self.state.sized(model, neuron)
        free = self.state.free_memory(neuron) or {}
        refused = self._refused.get(key)
        if refused is not None and refused[0] is not model:
            del self._refused[key]  # a reload: start afresh
            refused = None
        if refused is not None and sum(free.values()) <= refused[1]:
            devices = None  # refused with this much free: wait for more
        else:
            devices = place(entry, free) if feasible(entry, neuron) else None
            if devices is None and not self.state.measured_on(model, neuron):
                # Judged by another neuron's size or the catalogue's: ask it.
                devices = _devices_to_ask(entry, free)
        if devices is None:
            if key not in self._short:
                self._short.add(key)
                log.warning(
                    "cannot preload %s on %s, where it is pinned: it needs %d MiB, %d MiB "
                    "free; loading it there once there is room (a preload evicts nothing)",
                    model.id,
                    neuron.name,
                    entry.vram_mb,
                    sum(free.values()),
                )
            return None
        self._short.discard(key)
        self._refused.pop(key, None)
        predicted = self.loader.predictor.load(neuron, model.id)
        decision = Decision(Option("cold", neuron, predicted, plan=Plan(devices, [])))
        load = self.loader.start(decision, model.id, pinned=True)
        self._loads[key] = load
        return load

    def _next_retry(self, now: float) -> float:
        """trio time at which the next back-off still running ends (inf: none)."""
        ends = (f.retry_at for f in self._failures.values() if f.retry_at > now)
        return min(ends, default=math.inf)


def _devices_to_ask(model: CatalogModel, free: dict[int, int]) -> list[int] | None:
    """Devices to load ``model`` on to ask a neuron whether it fits (its own estimate decides).

    The host on a CPU host; on a GPU host the devices with the most free
    memory, as few as ``min_devices`` allows; None: it has fewer devices.
    """
    if not free or set(free) == {HOST}:
        return []
    count = max(1, model.min_devices)
    if count > len(free):
        return None
    return sorted(sorted(free, key=lambda i: (-free[i], i))[:count])
