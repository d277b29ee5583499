"""The gateway's view of the fleet: what each neuron has, and the catalogue.

The pollers write it; the router reads it (``scheduler.decide``) and records
the requests in flight; the loader records the loads and evictions it
carries out. Every change is a named method here. Everything here is plain
synchronous code: trio only switches tasks at an ``await``, so a
read-decide-mark sequence with no ``await`` in it is atomic, and the router
relies on that: between ``decide`` and ``Loader.start`` there is no
``await``, so a model chosen for eviction is marked before any request can
be routed to it.

Waiting is done on Events: ``FleetState.wait_changed()`` returns after the
next update of any neuron, a ``PendingLoad`` sets ``done`` when it ends.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import attrs
import trio

from cortex.config import CatalogModel, ModelsFile, NeuronEndpoint
from cortex.fleet import Discovery, Health, ModelStatus

#: The neuron-side states a gateway shows, plus its own.
LOADED = "loaded"
LOADING = "loading"
FAILED = "failed"


@attrs.define(eq=False)
class PendingLoad:
    """A load this gateway started (or joined) on one neuron.

    Every request that wants the model on that neuron waits on ``done``
    instead of starting a load of its own.
    """

    neuron: str
    model_id: str
    #: Memory the load will take, per device index (``-1``: host memory).
    reserve_mb: dict[int, int]
    #: Device indices sent with the load (empty: CPU host or the neuron decides).
    devices: list[int]
    #: Models to unload first, in order.
    evictions: list[str]
    #: True when the neuron was already loading it (we only wait, no cold start).
    joined: bool = False
    #: trio time the load was started.
    started: float | None = None
    #: A further replica of a model already loaded elsewhere (scale-out).
    replica: bool = False
    #: A preload of a model pinned on that neuron (``cortex.gateway.preload``).
    pinned: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Why it failed, once ``done``; None: it succeeded (``FleetState.load_finished``).
    error: Exception | None = None
    #: It failed for want of memory that planning now knows of: decide
    #: again, this neuron included (``FleetState.refused``).
    replan: bool = False
    #: Requests waiting on it now (what a request that joins it waits behind).
    waiters: int = 0

    def add_waiter(self) -> None:
        """A request starts waiting on this load."""
        self.waiters += 1

    def drop_waiter(self) -> None:
        """A request stops waiting on this load (it ended, or the request gave up)."""
        self.waiters -= 1


@attrs.define(eq=False)
class NeuronState:
    """One neuron as last seen by its poller, plus this gateway's own counts."""

    name: str
    endpoint: str
    token: str | None = None
    up: bool = False
    #: A request failed on it before its first byte; cleared by the next good poll.
    suspect: bool = False
    #: Its last poll said it is shutting down: what runs there finishes,
    #: nothing new (requests, loads) goes there.
    draining: bool = False
    last_seen: float | None = None
    last_error: str | None = None
    discovery: Discovery | None = None
    health: Health | None = None
    models: dict[str, ModelStatus] = attrs.field(factory=dict)
    #: Requests this gateway has in flight, per model (the neuron's figure lags a poll).
    in_flight: dict[str, int] = attrs.field(factory=dict)
    #: Requests on each model that are not this gateway's (other gateways',
    #: direct clients'), as of the last poll: the neuron's count less ours.
    foreign: dict[str, int] = attrs.field(factory=dict)
    #: Wall-clock time this gateway last sent each model a request.
    last_used: dict[str, float] = attrs.field(factory=dict)
    #: Models chosen for eviction whose unload has not finished.
    evicting: set[str] = attrs.field(factory=set)
    #: Models whose engine has had requests without making progress for
    #: longer than ``stall_timeout``, as of the last poll (``poller``):
    #: nothing new goes to them here until they move again.
    stalled: set[str] = attrs.field(factory=set)
    #: Raised by every change the gateway makes to ``models`` itself, so
    #: that a poll answer older than the change does not undo it.
    epoch: int = 0
    #: Set once the first poll has ended, reached or not.
    polled: trio.Event = attrs.field(factory=trio.Event)
    #: Set to make the poller poll now rather than at its next interval.
    poke: trio.Event = attrs.field(factory=trio.Event)

    @property
    def base_url(self) -> str:
        return self.endpoint.rstrip("/")

    @property
    def routable(self) -> bool:
        return self.up and not self.suspect and not self.draining

    @property
    def is_gpu(self) -> bool:
        return bool(self.discovery and self.discovery.devices)

    def status_of(self, model_id: str) -> str | None:
        """``loaded``, ``loading``, ``failed`` or None, activation included."""
        status = self.models.get(model_id)
        if status is not None:
            return status.status
        if self.health is not None:
            activation = self.health.activation
            if model_id in activation.in_progress or model_id in activation.pending:
                return LOADING
        return None

    def serves(self, model_id: str) -> bool:
        """Whether new requests for ``model_id`` may go here: loaded, neither
        being evicted nor stalled. (Whether the neuron itself is routable is
        the caller's to check.)"""
        return (
            self.status_of(model_id) == LOADED
            and model_id not in self.evicting
            and model_id not in self.stalled
        )

    def busy(self, model_id: str) -> int:
        """Requests on the model here: ours now, and others' as of the last poll."""
        return self.in_flight.get(model_id, 0) + self.foreign.get(model_id, 0)

    def recency(self, model_id: str) -> float:
        status = self.models.get(model_id)
        theirs = (status.last_used or status.loaded_at or 0.0) if status is not None else 0.0
        return max(self.last_used.get(model_id, 0.0), theirs)

    def begin_request(self, model_id: str, now: float | None = None) -> None:
        self.in_flight[model_id] = self.in_flight.get(model_id, 0) + 1
        self.last_used[model_id] = time.time() if now is None else now

    def end_request(self, model_id: str, now: float | None = None) -> None:
        left = self.in_flight.get(model_id, 0) - 1
        if left > 0:
            self.in_flight[model_id] = left
        else:
            self.in_flight.pop(model_id, None)
        self.last_used[model_id] = time.time() if now is None else now

    def mark_suspect(self, reason: str) -> None:
        self.suspect = True
        self.last_error = reason
        self.poke.set()

    def model_loaded(self, model_id: str, status: ModelStatus) -> None:
        """A load of ours has the model ready: route to it before the next poll shows it."""
        self.models[model_id] = status
        self.epoch += 1

    def model_gone(self, model_id: str) -> bool:
        """The model is no longer here; False if it was not known to be.

        Either way a poll under way is stale now (it may still show the model).
        """
        self.epoch += 1
        return self.models.pop(model_id, None) is not None

    def model_unloaded(self, model_id: str) -> None:
        """An unload of ours is over: the model is gone and no longer being evicted."""
        self.model_gone(model_id)
        self.end_evicting([model_id])

    def begin_evicting(self, model_ids: Iterable[str]) -> None:
        """These models are being unloaded: route nothing new to them, plan no room with them."""
        self.evicting.update(model_ids)

    def end_evicting(self, model_ids: Iterable[str]) -> None:
        """The unloads of these models are over (done or failed)."""
        self.evicting.difference_update(model_ids)


@attrs.frozen
class Catalogue:
    """models.toml, indexed: aliases naming one model, tiers naming several."""

    models: dict[str, CatalogModel]
    aliases: dict[str, str]
    #: Alias -> its members in order of preference (the router picks one).
    tiers: dict[str, list[str]] = attrs.field(factory=dict)

    @classmethod
    def from_file(cls, models: ModelsFile) -> Catalogue:
        aliases = {k: v for k, v in models.aliases.items() if isinstance(v, str)}
        tiers = {k: list(v) for k, v in models.aliases.items() if not isinstance(v, str)}
        return cls(models={m.id: m for m in models.models}, aliases=aliases, tiers=tiers)

    def resolve(self, name: str) -> str:
        """The concrete id for ``name`` (an alias or an id; a tier stays as it is)."""
        return self.aliases.get(name, name)


# -- placement ----------------------------------------------------------------
# Host memory (CPU-only neurons) is keyed by HOST in the free/reserve maps.

HOST = -1


def _share(model: CatalogModel, count: int) -> int:
    return max(model.min_device_vram_mb, math.ceil(model.vram_mb / count))


def place(model: CatalogModel, free: dict[int, int]) -> list[int] | None:
    """Where ``model`` fits given free memory per device, or None.

    ``free`` maps device index to free MiB, or only ``HOST`` for a CPU host.
    Returns the device indices to use (``[]`` on a CPU host). On a GPU host
    the model is split over as few devices as its ``min_devices`` allows,
    each holding ``vram_mb / count`` and at least ``min_device_vram_mb``;
    the devices with the most free memory are chosen.
    """
    if set(free) == {HOST}:
        return [] if model.vram_mb <= free[HOST] else None
    ranked = sorted(free, key=lambda i: (-free[i], i))
    for count in range(max(1, model.min_devices), len(ranked) + 1):
        chosen = ranked[:count]
        need = _share(model, count)
        if all(free[i] >= need for i in chosen):
            return sorted(chosen)
    return None


def reservation(model: CatalogModel, devices: list[int]) -> dict[int, int]:
    if not devices:
        return {HOST: model.vram_mb}
    need = _share(model, len(devices))
    return dict.fromkeys(devices, need)


def capacity(neuron: NeuronState) -> dict[int, int] | None:
    """Total memory per device (or host) from discovery and health; None: unknown."""
    if neuron.discovery is None:
        return None
    if neuron.discovery.devices:
        return {d.index: d.vram_total_mb for d in neuron.discovery.devices}
    if neuron.health is not None:
        return {HOST: neuron.health.memory.total_mb}
    return {HOST: neuron.discovery.ram_total_mb}


def feasible(model: CatalogModel, neuron: NeuronState) -> bool:
    """Whether ``model`` could ever fit on ``neuron`` (all of its memory free)."""
    total = capacity(neuron)
    if total is None:
        return False
    shape = (model.vram_mb, model.min_devices, model.min_device_vram_mb)
    return _fits_empty(shape, tuple(total.items()))


def fits_nowhere(
    model: CatalogModel, neurons: Iterable[NeuronState], named: str | None = None
) -> str | None:
    """Why ``model`` can never be served: it fits on no neuron, each polled at least once.

    ``named``: the model as the message names it (the tier or alias the
    client asked for, with it); None: its id.

    Returns:
      The reason, naming what the model needs; None while some neuron could
      hold it, or one never polled might.
    """
    if any(n.discovery is None or feasible(model, n) for n in neurons):
        return None
    return (
        f"model {named or repr(model.id)} fits on no neuron of the fleet "
        f"(needs {model.vram_mb} MiB over at least {model.min_devices} device(s))"
    )


@functools.lru_cache(maxsize=4096)
def _fits_empty(shape: tuple[int, int, int], total: tuple[tuple[int, int], ...]) -> bool:
    # The router asks this of every neuron for every decision; the answer
    # changes only with the model's shape and the neuron's devices.
    vram_mb, min_devices, min_device_vram_mb = shape
    model = CatalogModel(
        id="", vram_mb=vram_mb, min_devices=min_devices, min_device_vram_mb=min_device_vram_mb
    )
    return place(model, dict(total)) is not None


def _loaded_mb(status: ModelStatus | None) -> int:
    """The memory ``status`` reports its model loaded in; 0: not loaded, or not said."""
    if status is not None and status.status == LOADED and status.memory_mb > 0:
        return status.memory_mb
    return 0


def model_memory(status: ModelStatus, gpu: bool) -> dict[int, int]:
    """A loaded model's memory per device index (or HOST)."""
    if not gpu or not status.devices:
        return {HOST: status.memory_mb}
    share = math.ceil(status.memory_mb / len(status.devices))
    return dict.fromkeys(status.devices, share)


@attrs.define(eq=False)
class FleetState:
    """Every neuron, the catalogue, and the loads in progress."""

    catalogue: Catalogue
    neurons: dict[str, NeuronState]
    #: (neuron, model id) -> the load in progress there.
    pending: dict[tuple[str, str], PendingLoad] = attrs.field(factory=dict)
    started_at: float = attrs.field(factory=time.time)
    #: Wall-clock seconds, the clock of ``last_used`` (the simulation's is virtual).
    clock: Callable[[], float] = time.time
    #: What neurons said of models' memory, by (model id, source): the
    #: least they reported loaded, and the most a refusal said it needs.
    _reported_mb: dict[tuple[str, str], int] = attrs.field(factory=dict)
    _needs_mb: dict[tuple[str, str], int] = attrs.field(factory=dict)
    #: The same by ((model id, source), neuron): what each neuron said of
    #: itself (the last size it reported, the most it said it needs), which
    #: plans for that neuron prefer (another's KV cache may be laid out
    #: otherwise: per slot there, unified here).
    _reported_on: dict[tuple[tuple[str, str], str], int] = attrs.field(factory=dict)
    _needs_on: dict[tuple[tuple[str, str], str], int] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    #: Every id this gateway's catalogue has held since it started: a model
    #: a reload retired is still this gateway's to evict (``evictor``).
    catalogued: set[str] = attrs.field(factory=set)
    #: Catalogue entries a neuron refused to load as a bad request: id ->
    #: (the entry, why). Kept while that very entry is the catalogue's; a
    #: reload makes new entries, so it forgets them.
    _invalid: dict[str, tuple[CatalogModel, str]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.catalogued.update(self.catalogue.models)

    @classmethod
    def build(
        cls,
        endpoints: Iterable[NeuronEndpoint],
        models: ModelsFile,
        *,
        clock: Callable[[], float] = time.time,
    ) -> FleetState:
        neurons = {
            e.name: NeuronState(name=e.name, endpoint=e.endpoint, token=e.token) for e in endpoints
        }
        return cls(catalogue=Catalogue.from_file(models), neurons=neurons, clock=clock)

    def replace_catalogue(self, catalogue: Catalogue) -> None:
        """A reload: ``catalogue`` is the catalogue now; what was found invalid is forgotten."""
        self.catalogue = catalogue
        self.catalogued.update(catalogue.models)
        self._invalid.clear()
        self.changed()

    def retired(self, model_id: str) -> bool:
        """Whether ``model_id`` was in this gateway's catalogue and a reload took it out."""
        return model_id in self.catalogued and model_id not in self.catalogue.models

    def entry_invalid(self, model: CatalogModel, reason: str) -> None:
        """A neuron refused to load ``model`` (the catalogue's entry) as a bad request.

        Requests for it fail with ``reason`` at once (``invalid``) until a
        reload; nothing is evicted for it meanwhile.
        """
        if self.catalogue.models.get(model.id) is model:
            self._invalid[model.id] = (model, reason)
            self.changed()

    def invalid(self, model_id: str) -> str | None:
        """Why the catalogue's entry for ``model_id`` cannot load; None: not known to be bad."""
        found = self._invalid.get(model_id)
        if found is None or self.catalogue.models.get(model_id) is not found[0]:
            return None
        return found[1]

    def load_started(self, load: PendingLoad) -> None:
        """A load of ours begins: its room is reserved, its victims are being evicted."""
        self.pending[(load.neuron, load.model_id)] = load
        self.neurons[load.neuron].begin_evicting(load.evictions)

    def load_finished(self, load: PendingLoad, error: Exception | None = None) -> None:
        """A load of ours is over (``error``: why it failed); wakes its waiters and everyone else.

        Call it in the same step as the refresh that shows the model (or its
        failure): dropping the reservation then, no moment counts it twice or never.
        """
        load.error = error
        self.neurons[load.neuron].end_evicting(load.evictions)
        del self.pending[(load.neuron, load.model_id)]
        load.done.set()
        self.changed()

    def sized(self, model: CatalogModel, neuron: NeuronState | None = None) -> CatalogModel:
        """``model`` with the ``vram_mb`` to plan with: the catalogue's, or what was learned.

        With no ``vram_mb`` (0), the least memory a neuron reported for it
        loaded; and never less than a neuron's refusal said it needs (a
        ``vram_mb`` set too low would otherwise never make room for it).
        ``neuron``: sized for a load there: what that neuron said of the
        model itself (its loaded size, its refusal's need), where it said
        anything, before what the others did.
        """
        key = (model.id, model.source or model.id)
        said = self._said_on(model, neuron) if neuron is not None else None
        if said is not None:
            own, need = said
            vram_mb = max(model.vram_mb or own, need)
        else:
            reported = [
                memory_mb
                for n in self.neurons.values()
                if (memory_mb := _loaded_mb(n.models.get(model.id)))
            ]
            if key in self._reported_mb:
                reported.append(self._reported_mb[key])
            vram_mb = model.vram_mb or min(reported, default=0)
            vram_mb = max(vram_mb, self._needs_mb.get(key, 0))
        return model if vram_mb == model.vram_mb else attrs.evolve(model, vram_mb=vram_mb)

    def measured_on(self, model: CatalogModel, neuron: NeuronState) -> bool:
        """Whether ``neuron`` itself said how much ``model`` takes there (loaded, or refused)."""
        return self._said_on(model, neuron) is not None

    def _said_on(self, model: CatalogModel, neuron: NeuronState) -> tuple[int, int] | None:
        """What ``neuron`` itself said of ``model``: (its size there, loaded now or last
        reported, 0: none; the most a refusal there said it needs, 0: none); None: nothing."""
        here = ((model.id, model.source or model.id), neuron.name)
        own = _loaded_mb(neuron.models.get(model.id)) or self._reported_on.get(here, 0)
        if not own and here not in self._needs_on:
            return None
        return own, self._needs_on.get(here, 0)

    def entry(self, model_id: str, neuron: NeuronState | None = None) -> CatalogModel | None:
        """The catalogue's entry for ``model_id`` sized to plan with on ``neuron``; None: none."""
        model = self.catalogue.models.get(model_id)
        return None if model is None else self.sized(model, neuron)

    def reported(
        self, model: CatalogModel, memory_mb: int, neuron: NeuronState | None = None
    ) -> None:
        """A neuron reported ``model`` loaded in ``memory_mb``: an estimate for next time."""
        if memory_mb > 0:
            key = (model.id, model.source or model.id)
            self._reported_mb[key] = min(memory_mb, self._reported_mb.get(key, memory_mb))
            if neuron is not None:
                self._reported_on[(key, neuron.name)] = memory_mb

    def refused(self, model: CatalogModel, need_mb: int, neuron: NeuronState | None = None) -> bool:
        """``neuron`` refused ``model`` for want of memory: it needs ``need_mb``.

        Returns whether that is more than it was planned with (a new plan
        may now make room for it); False: planning with it again would not.
        """
        key = (model.id, model.source or model.id)
        planned = self.sized(model, neuron).vram_mb
        if neuron is not None:
            here = (key, neuron.name)
            self._needs_on[here] = max(need_mb, self._needs_on.get(here, 0))
        if need_mb <= planned:
            return False
        self._needs_mb[key] = max(need_mb, self._needs_mb.get(key, 0))
        return True

    def model_missing(self, neuron: NeuronState, model_id: str) -> None:
        """``neuron`` said it does not have ``model_id``: route nothing there, poll it now."""
        if model_id in neuron.models:
            neuron.model_gone(model_id)
            neuron.poke.set()
            self.changed()

    def changed(self) -> None:
        """Wake everyone in ``wait_changed``."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def all_polled(self) -> bool:
        """Whether every neuron has been polled once (reached or not)."""
        return all(neuron.polled.is_set() for neuron in self.neurons.values())

    async def wait_polled(self) -> None:
        """Return once every neuron has been polled once (reached or not).

        Not a checkpoint once they have: every request passes here, and a
        trip through the scheduler costs it more than the rest of the check.
        """
        for neuron in self.neurons.values():
            if not neuron.polled.is_set():
                await neuron.polled.wait()

    def routable(self) -> Iterator[NeuronState]:
        return (n for n in self.neurons.values() if n.routable)

    def known(self, model_id: str) -> bool:
        """In the catalogue, or loaded or loading on some neuron (a load of ours included)."""
        return (
            model_id in self.catalogue.models
            or any(n.status_of(model_id) in (LOADED, LOADING) for n in self.neurons.values())
            or any(pending_id == model_id for (_, pending_id) in self.pending)
        )

    def pinned(self, neuron: NeuronState, model_id: str) -> bool:
        """Whether the catalogue pins ``model_id`` on ``neuron`` (never evicted there)."""
        entry = self.catalogue.models.get(model_id)
        return entry is not None and neuron.name in entry.pinned_on

    def holds(self, neuron: NeuronState, model_id: str) -> bool:
        """Whether ``neuron`` has ``model_id`` loaded or loading (a load of ours included).

        A failed load the neuron keeps a record of is not holding it.
        """
        return (
            neuron.status_of(model_id) in (LOADED, LOADING)
            or (neuron.name, model_id) in self.pending
        )

    def free_memory(self, neuron: NeuronState) -> dict[int, int] | None:
        """Free memory per device (or HOST) as planning should see it.

        The last health sample, minus what this gateway's pending loads will
        take of it (neither shows in health until the next sample after it
        happens). A load that evicts first takes the room its victims give
        back, so it claims only what they do not cover: their memory is not
        free for anyone else, since another load could start before they
        are gone.
        """
        if neuron.discovery is None or neuron.health is None:
            return None
        gpu = neuron.is_gpu
        if gpu:
            free = {d.index: d.vram_free_mb for d in neuron.health.devices}
            for device in neuron.discovery.devices:
                free.setdefault(device.index, device.vram_total_mb)
        else:
            free = {HOST: neuron.health.memory.free_mb}
        for (name, _), load in self.pending.items():
            if name != neuron.name or load.joined:
                continue
            freeing: dict[int, int] = {}
            for victim in load.evictions:
                status = neuron.models.get(victim)
                if status is not None:
                    for index, mb in model_memory(status, gpu).items():
                        freeing[index] = freeing.get(index, 0) + mb
            for index, mb in load.reserve_mb.items():
                if index in free:
                    free[index] -= max(0, mb - freeing.get(index, 0))
        return free
