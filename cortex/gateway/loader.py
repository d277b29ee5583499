"""Carrying out the router's decisions: loads, the evictions before them, scale-in.

The router decides (``cortex.gateway.scheduler.decide``) and hands a
decision that needs a load to :meth:`Loader.start`, which records the load
in the fleet state (its room reserved, its victims marked) in the same
step, with no ``await``, and runs it as a task of the loader's own nursery:
when the client that started a load goes away, the load still finishes for
the others waiting on it. A replica added to scale out gets a task of its
own that unloads it once it has been idle long enough
(``scheduler.scale_in`` says when).

The loader acts on neurons only through ``NeuronLink`` (HTTP in the
gateway, in process in ``cortex.sim``) and records what it sees: load times
in the ``Observations``, evictions and reloads in the ``ThrashLog``, the
model's state in the ``FleetState`` (and there, a catalogue entry a neuron
refused as a bad request: no load of it is planned again until a reload),
and the metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from cortex.config import CatalogModel, GatewayConfig
from cortex.errors import (
    CortexError,
    InsufficientMemory,
    InvalidCatalogueEntry,
    ModelNotFound,
    NeuronUnreachable,
    UpstreamError,
)
from cortex.fleet import ModelStatus
from cortex.gateway.affinity import Affinity
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.poller import refresh
from cortex.gateway.scheduler import (
    Decision,
    Observations,
    Policy,
    Predictor,
    ThrashLog,
    WaitQueue,
    scale_in,
)
from cortex.gateway.state import LOADED, FleetState, NeuronState, PendingLoad, reservation
from cortex.gateway.upstream import NeuronLink

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Loader:
    """Runs loads (evicting first where planned) and scale-ins on the neurons."""

    config: GatewayConfig
    state: FleetState
    api: NeuronLink
    metrics: GatewayMetrics
    observations: Observations
    predictor: Predictor
    thrash: ThrashLog
    affinity: Affinity
    policy: Policy
    queue: WaitQueue
    #: Owns the loads, evictions and scale-ins; open while ``run`` runs.
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loads, evictions and scale-ins that are started, until cancelled.

        Start it with ``await nursery.start(loader.run)`` before any request
        arrives: ``start`` needs it running.

        Cancellation:
          Cancels every load, eviction and scale-in under way.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, decision: Decision, model_id: str, *, pinned: bool = False) -> PendingLoad:
        """Start the load ``decision``'s route stands for and return it (no await in here).

        A route with a plan loads there after its evictions; one without
        joins a load the neuron reports. The load is in the fleet state when
        this returns; its ``done`` is set when it ends, ``error`` saying how.
        ``pinned``: a preload of a model pinned there (``cortex.gateway.preload``).

        Raises:
          RuntimeError: ``run`` is not running.
        """
        if self._nursery is None:
            raise RuntimeError("start Loader.run first")
        route = decision.route
        assert route is not None and route.kind in ("loading", "cold", "evict"), route
        entry = self.state.entry(model_id, route.neuron)
        now = trio.current_time()
        if route.plan is None:
            load = PendingLoad(
                neuron=route.neuron.name,
                model_id=model_id,
                reserve_mb={},
                devices=[],
                evictions=[],
                joined=True,
                started=now,
            )
        else:
            assert entry is not None
            load = PendingLoad(
                neuron=route.neuron.name,
                model_id=model_id,
                reserve_mb=reservation(entry, route.plan.devices),
                devices=route.plan.devices,
                evictions=route.plan.evictions,
                started=now,
                replica=decision.scale_out,
                pinned=pinned,
            )
        self.state.load_started(load)
        self._nursery.start_soon(self._run_load, load, entry)
        return load

    def _load_body(self, load: PendingLoad, entry: CatalogModel | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": load.model_id, "source": load.model_id}
        if entry is not None:
            body["source"] = entry.source or entry.id
            if entry.harness:
                body["harness"] = entry.harness
            if entry.chat_format:
                body["chat_format"] = entry.chat_format
            if entry.options:
                body["options"] = entry.options
        if load.devices:
            body["devices"] = load.devices
        return body

    async def _unload(self, neuron: NeuronState, model_id: str) -> None:
        status, entry = neuron.models.get(model_id), self.state.catalogue.models.get(model_id)
        if status is not None and entry is not None:
            self.state.reported(entry, status.memory_mb, neuron)
        try:
            await self.api.unload(neuron, model_id)
        except ModelNotFound:
            pass  # already gone: the room is there all the same
        neuron.model_unloaded(model_id)
        self.affinity.forget(neuron.name, model_id)

    async def _run_load(self, load: PendingLoad, entry: CatalogModel | None) -> None:
        """Evict, load, record; errors end up in ``load.error``, never raised."""
        neuron = self.state.neurons[load.neuron]
        # The entry as the catalogue has it now: a reload during the load
        # makes new entries, and a refusal says nothing of those.
        listed = self.state.catalogue.models.get(load.model_id)
        start = trio.current_time()
        error: CortexError | None = None
        try:
            for victim in load.evictions:
                log.warning(
                    "evicting %s from %s to make room for %s", victim, neuron.name, load.model_id
                )
                await self._unload(neuron, victim)
                self.thrash.evicted(victim, trio.current_time())
                self.metrics.evictions.labels(victim, neuron.name).inc()
            if load.evictions:
                await self._refresh(neuron)
            if load.pinned:
                log.info("loading %s on %s, where it is pinned", load.model_id, neuron.name)
            elif not load.joined:
                log.info("loading %s on %s", load.model_id, neuron.name)
            load_start = trio.current_time()
            status = await self.api.load(neuron, self._load_body(load, entry))
            if status is not None and status.status == LOADED and entry is not None:
                self.state.reported(entry, status.memory_mb, neuron)
            if status is None or status.status != LOADED:
                status = ModelStatus(
                    id=load.model_id,
                    harness=entry.harness if entry else None,
                    status=LOADED,
                    memory_mb=entry.vram_mb if entry else 0,
                )
            neuron.model_loaded(load.model_id, status)
            elapsed = trio.current_time() - start
            if not load.joined:
                now = trio.current_time()
                self.observations.record_load(
                    neuron.name, load.model_id, self.predictor.size(load.model_id), now - load_start
                )
                self.metrics.cold_starts.labels(load.model_id, neuron.name).inc()
                self.metrics.load_seconds.labels(load.model_id, neuron.name).observe(elapsed)
                if self.thrash.loaded(load.model_id, now):
                    self.metrics.thrash.labels(load.model_id).inc()
                log.info("loaded %s on %s in %.1f s", load.model_id, neuron.name, elapsed)
                if load.replica and self.policy.scales_in:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._scale_in, neuron, load.model_id)
            await self._refresh(neuron)
        except trio.Cancelled:
            raise
        except CortexError as exc:
            if isinstance(exc, NeuronUnreachable):
                neuron.mark_suspect(exc.message)
            where = f"loading {load.model_id!r} on {neuron.name} failed"
            if isinstance(exc, InsufficientMemory) and entry is not None and exc.need_mb:
                # Planned with too small a size (no vram_mb, or too low a
                # one): plan again with what the neuron says it needs,
                # evicting for it, once its memory as it is now is known.
                load.replan = self.state.refused(entry, exc.need_mb, neuron)
                if load.replan:
                    await self._refresh(neuron)
            if exc.status < 500:
                # A load refused as a bad request (bad options, no such
                # source, a file no engine reads) is the operator's
                # catalogue at fault, never the client's.
                exc = (
                    InvalidCatalogueEntry(
                        f"the catalogue entry for {load.model_id!r} is invalid: "
                        f"{where}: {exc.message}"
                    )
                    if entry is not None
                    else UpstreamError(f"{where}: {exc.message}")
                )
                if listed is not None:
                    # It would fail the same anywhere: refuse it at once
                    # until a reload rather than evict for it again.
                    self.state.entry_invalid(listed, exc.message)
            else:
                exc.message = f"{where}: {exc.message}"
            error = exc
            if load.pinned and isinstance(exc, InsufficientMemory):
                # The preloader says it once: it waits for room, no failure.
                log.debug("%s", exc.message)
            elif load.replan:
                log.warning("%s; planning again with what it needs", exc.message)
            else:
                log.warning("%s", exc.message)
        except Exception as exc:
            error = UpstreamError(f"loading {load.model_id!r} on {neuron.name} failed: {exc}")
            log.exception("loading %s on %s failed", load.model_id, neuron.name)
        finally:
            # In the same step as the refresh that shows the model (or its failure).
            self.state.load_finished(load, error)

    async def _refresh(self, neuron: NeuronState) -> None:
        try:
            await refresh(self.api, self.state, neuron)
        except CortexError:
            pass  # marked down by refresh; the router will look elsewhere

    async def _scale_in(self, neuron: NeuronState, model_id: str) -> None:
        """Unload a replica added to scale out once ``scheduler.scale_in`` says it goes.

        Returns once it is gone, whoever unloaded it.
        """
        idle_limit = self.config.routing.scale_in_idle
        while True:
            now = scale_in(self.state, self.queue, neuron, model_id, idle_limit)
            if now.unload:
                log.info("unloading %s from %s: an extra replica, idle", model_id, neuron.name)
                neuron.begin_evicting([model_id])
                try:
                    await self._unload(neuron, model_id)
                except CortexError as exc:
                    log.warning("unloading %s from %s failed: %s", model_id, neuron.name, exc)
                finally:
                    neuron.end_evicting([model_id])
                self.metrics.route_decisions.labels("scale_in").inc()
                await self._refresh(neuron)
                self.state.changed()
                return
            if now.recheck is None:
                return
            await trio.sleep(now.recheck)
