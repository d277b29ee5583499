"""Routing: from a model name to a neuron that has the model loaded.

Preference, in order:

1. loaded on a routable neuron (up, not suspect): fewest requests in flight,
   then the most recently used;
2. a load already under way (this gateway's, or one the neuron reports):
   wait for it;
3. a cold load on a neuron where the catalogue's placement fits the
   discovered devices, evicting what ``evictor.plan`` chooses.

A load runs as a task in the gateway's nursery, not in the request that
started it: when that client goes away the load still finishes for the
others waiting on it. Each (neuron, model) has at most one load in
progress; every request that wants it waits on its ``done`` Event, so two
requests for one cold model cause one load.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from cortex.config import CatalogModel, GatewayConfig
from cortex.errors import CortexError, ModelNotFound, RequestError, Unavailable, UpstreamError
from cortex.fleet import ModelStatus
from cortex.gateway import evictor
from cortex.gateway.metrics import UNKNOWN, GatewayMetrics
from cortex.gateway.poller import refresh
from cortex.gateway.state import (
    LOADED,
    LOADING,
    FleetState,
    NeuronState,
    PendingLoad,
    feasible,
    reservation,
)
from cortex.gateway.upstream import NeuronAPI

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Router:
    config: GatewayConfig
    state: FleetState
    api: NeuronAPI
    metrics: GatewayMetrics
    #: Owns the load tasks; set by ``run_gateway`` before any request arrives.
    nursery: trio.Nursery | None = None

    # -- names ----------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The concrete model id for ``name``.

        Raises:
          ModelNotFound: neither an alias, a catalogue model, nor loaded anywhere.
        """
        model_id = self.state.catalogue.resolve(name)
        if not self.state.known(model_id):
            raise ModelNotFound(f"model {name!r} does not exist", param="model")
        return model_id

    def label(self, name: str | None) -> str:
        """The metrics label for a requested model name."""
        if not name:
            return UNKNOWN
        model_id = self.state.catalogue.resolve(name)
        return model_id if self.state.known(model_id) else UNKNOWN

    # -- routes ---------------------------------------------------------------

    async def acquire(self, model_id: str, *, exclude: set[str]) -> NeuronState:
        """A neuron with ``model_id`` loaded, its request count already raised.

        The caller must call ``release`` once the request is over. Neurons
        named in ``exclude`` are skipped; neurons whose load of the model
        fails are added to it.

        Raises:
          ModelNotFound: no neuron can ever serve it.
          Unavailable: none can now (all busy, down, or the load timed out).
          CortexError: the load failed everywhere it was tried (its error).
        """
        last_error: CortexError | None = None
        with trio.move_on_after(self.config.gateway.load_timeout):
            await self.state.wait_polled()
            while True:
                neuron = self._pick_loaded(model_id, exclude)
                if neuron is not None:
                    neuron.begin_request(model_id)
                    self.metrics.in_flight.labels(model_id, neuron.name).inc()
                    return neuron
                load = self._pending(model_id, exclude) or self._start_load(
                    model_id, exclude, last_error
                )
                load.waiters += 1
                try:
                    await load.done.wait()
                finally:
                    load.waiters -= 1
                if load.error is not None:
                    exclude.add(load.neuron)
                    last_error = load.error
        raise Unavailable(f"timed out waiting for {model_id!r} to load")

    def release(self, neuron: NeuronState, model_id: str) -> None:
        neuron.end_request(model_id)
        self.metrics.in_flight.labels(model_id, neuron.name).dec()

    def forget(self, neuron: NeuronState, model_id: str) -> None:
        """The neuron said it does not have ``model_id``: stop routing there."""
        if neuron.models.pop(model_id, None) is not None:
            neuron.epoch += 1
            neuron.poke.set()
            self.state.changed()

    def _pick_loaded(self, model_id: str, exclude: set[str]) -> NeuronState | None:
        found = [
            n
            for n in self.state.routable()
            if n.name not in exclude
            and n.status_of(model_id) == LOADED
            and model_id not in n.evicting
        ]
        if not found:
            return None
        return min(found, key=lambda n: (n.busy(model_id), -n.recency(model_id), n.name))

    def _pending(self, model_id: str, exclude: set[str]) -> PendingLoad | None:
        for (name, pending_id), load in self.state.pending.items():
            if pending_id == model_id and name not in exclude and self.state.neurons[name].routable:
                return load
        return None

    # -- loads ----------------------------------------------------------------

    def _start_load(
        self, model_id: str, exclude: set[str], last_error: CortexError | None
    ) -> PendingLoad:
        """Start the best load for ``model_id`` and return it (no await in here).

        Raises:
          ModelNotFound, Unavailable, or ``last_error`` when nothing is left to try.
        """
        entry = self.state.catalogue.models.get(model_id)
        usable = [n for n in self.state.routable() if n.name not in exclude]
        # A load the neuron reports (activation at its start, another
        # gateway's load): the neuron loads each id once, so asking it to load
        # joins that load and answers when it is done.
        for neuron in usable:
            if neuron.status_of(model_id) == LOADING:
                load = PendingLoad(
                    neuron=neuron.name,
                    model_id=model_id,
                    reserve_mb={},
                    devices=[],
                    evictions=[],
                    joined=True,
                )
                return self._launch(load, entry)
        if entry is None:
            if last_error is not None:
                raise last_error
            if self.state.known(model_id):
                raise Unavailable(f"no neuron that has {model_id!r} is available")
            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
        candidates = [n for n in usable if feasible(entry, n)]
        if not candidates:
            raise last_error or self._no_candidate(entry)
        strategy = self.config.eviction.strategy
        plans = [(n, evictor.plan(self.state, n, entry, strategy)) for n in candidates]
        fitting = [(n, p) for n, p in plans if p is not None]
        if not fitting:
            raise last_error or Unavailable(
                f"no room for {model_id!r} on {', '.join(n.name for n in candidates)} now: "
                "the models there are pinned or busy"
            )

        def preference(item: tuple[NeuronState, evictor.Plan]) -> tuple[Any, ...]:
            neuron, plan = item
            free = self.state.free_memory(neuron) or {}
            return (
                neuron.name not in entry.pinned_on,
                len(plan.evictions),
                -sum(free.values()),
                neuron.name,
            )

        neuron, plan = min(fitting, key=preference)
        neuron.evicting.update(plan.evictions)
        load = PendingLoad(
            neuron=neuron.name,
            model_id=model_id,
            reserve_mb=reservation(entry, plan.devices),
            devices=plan.devices,
            evictions=plan.evictions,
        )
        return self._launch(load, entry)

    def _no_candidate(self, entry: CatalogModel) -> CortexError:
        neurons = list(self.state.neurons.values())
        if any(n.discovery is not None and feasible(entry, n) for n in neurons) or any(
            n.discovery is None for n in neurons
        ):
            return Unavailable(f"no neuron that can load {entry.id!r} is available now")
        return ModelNotFound(
            f"model {entry.id!r} fits on no neuron of the fleet "
            f"(needs {entry.vram_mb} MiB over at least {entry.min_devices} device(s))",
            param="model",
        )

    def _launch(self, load: PendingLoad, entry: CatalogModel | None) -> PendingLoad:
        assert self.nursery is not None, "run_gateway sets the router's nursery"
        self.state.pending[(load.neuron, load.model_id)] = load
        self.nursery.start_soon(self._run_load, load, entry)
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

    async def _run_load(self, load: PendingLoad, entry: CatalogModel | None) -> None:
        """Evict, load, record; errors end up in ``load.error``, never raised."""
        neuron = self.state.neurons[load.neuron]
        start = trio.current_time()
        try:
            for victim in load.evictions:
                log.warning(
                    "evicting %s from %s to make room for %s", victim, neuron.name, load.model_id
                )
                try:
                    await self.api.unload(neuron, victim)
                except ModelNotFound:
                    pass  # already gone: the room is there all the same
                neuron.models.pop(victim, None)
                neuron.evicting.discard(victim)
                neuron.epoch += 1
                self.metrics.evictions.labels(victim, neuron.name).inc()
            if load.evictions:
                await self._refresh(neuron)
            if not load.joined:
                log.info("loading %s on %s", load.model_id, neuron.name)
            status = await self.api.load(neuron, self._load_body(load, entry))
            if status is None or status.status != LOADED:
                status = ModelStatus(
                    id=load.model_id,
                    harness=entry.harness if entry else None,
                    status=LOADED,
                    memory_mb=entry.vram_mb if entry else 0,
                )
            neuron.models[load.model_id] = status
            neuron.epoch += 1
            elapsed = trio.current_time() - start
            if not load.joined:
                self.metrics.cold_starts.labels(load.model_id, neuron.name).inc()
                self.metrics.load_seconds.labels(load.model_id, neuron.name).observe(elapsed)
                log.info("loaded %s on %s in %.1f s", load.model_id, neuron.name, elapsed)
            await self._refresh(neuron)
        except trio.Cancelled:
            raise
        except CortexError as exc:
            # A load refused as a bad request (no such source, bad options)
            # is the catalogue's fault, not the client's: a 502 for them.
            if isinstance(exc, RequestError):
                exc = UpstreamError(exc.message)
            exc.message = f"loading {load.model_id!r} on {neuron.name} failed: {exc.message}"
            load.error = exc
            log.warning("%s", exc.message)
        except Exception as exc:
            load.error = UpstreamError(f"loading {load.model_id!r} on {neuron.name} failed: {exc}")
            log.exception("loading %s on %s failed", load.model_id, neuron.name)
        finally:
            neuron.evicting.difference_update(load.evictions)
            # Drop the reservation in the same step as the health that shows
            # the model (or its failure): no moment counts it twice or never.
            del self.state.pending[(load.neuron, load.model_id)]
            load.done.set()
            self.state.changed()

    async def _refresh(self, neuron: NeuronState) -> None:
        try:
            await refresh(self.api, self.state, neuron)
        except CortexError:
            pass  # marked down by refresh; the router will look elsewhere
