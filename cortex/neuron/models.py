"""The neuron's loaded models: loading, serving, unloading, activation.

``ModelManager`` holds one ``ModelSlot`` per model id. A load runs as a task
in the manager's nursery, not in the request that asked for it, so a client
that goes away does not abort a load others wait for; two loads of one id
share one slot and load once. A loaded slot owns a ``GenerationWorker``
task in the same nursery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pluggy
import trio

from cortex.config import NeuronModel
from cortex.errors import (
    CortexError,
    InsufficientMemory,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NoHarness,
    Unavailable,
    UnsupportedModelFormat,
)
from cortex.fleet import Activation, ActivationFailure, ModelState, ModelStatus
from cortex.harness import LoadedModel, LoadSpec, Placement, harness_infos
from cortex.neuron import sources
from cortex.neuron.workers import GenerationWorker, Job

log = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class LoadRequest:
    """What ``POST /models/load`` asks for."""

    model_id: str
    source: str
    harness: str | None = None
    chat_format: str | None = None
    devices: tuple[int, ...] = ()
    options: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, body: Any) -> LoadRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        known = {"model_id", "source", "path", "harness", "chat_format", "devices", "options"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidRequest(f"unknown fields {unknown}", param=unknown[0])
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("model_id must be a non-empty string", param="model_id")
        source = body.get("source", body.get("path"))
        if source is None:
            source = model_id
        if not isinstance(source, str) or not source:
            raise InvalidRequest("source must be a non-empty string", param="source")
        for key in ("harness", "chat_format"):
            if body.get(key) is not None and (not isinstance(body[key], str) or not body[key]):
                raise InvalidRequest(f"{key} must be a non-empty string", param=key)
        devices = body.get("devices") or []
        if not isinstance(devices, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        ):
            raise InvalidRequest("devices must be a list of device indices", param="devices")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise InvalidRequest("options must be an object", param="options")
        return cls(
            model_id=model_id,
            source=source,
            harness=body.get("harness"),
            chat_format=body.get("chat_format"),
            devices=tuple(devices),
            options=options,
        )

    @classmethod
    def from_config(cls, model: NeuronModel) -> LoadRequest:
        return cls(
            model_id=model.id,
            source=model.source,
            harness=model.harness,
            chat_format=model.chat_format,
            devices=tuple(model.devices or ()),
            options=dict(model.options),
        )


@attrs.define(eq=False)
class ModelSlot:
    id: str
    status: ModelState
    devices: tuple[int, ...] = ()
    harness: str | None = None
    model: LoadedModel | None = None
    worker: GenerationWorker | None = None
    error: str | None = None
    #: Why the load failed, re-raised to everyone who waited for it.
    failure: CortexError | None = None
    loaded_at: float | None = None
    memory_mb: int = 0
    #: Set when the load ends, either way.
    settled: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the worker task has returned.
    worker_done: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the model is freed and the slot left ``slots``.
    gone: trio.Event = attrs.field(factory=trio.Event)
    unloading: bool = False
    #: Requests rendering or tokenizing on the model outside its worker.
    users: int = 0
    #: Set whenever ``users`` drops to zero; a fresh Event is made per wait.
    idle: trio.Event = attrs.field(factory=trio.Event)

    def status_view(self) -> ModelStatus:
        stats = self.worker.statistics() if self.worker else None
        return ModelStatus(
            id=self.id,
            harness=self.harness,
            status=self.status,
            devices=list(self.devices),
            memory_mb=self.memory_mb,
            loaded_at=self.loaded_at,
            last_used=stats.last_used if stats else None,
            in_flight=stats.in_flight if stats else 0,
            queued=stats.queued if stats else 0,
            n_ctx=self.model.n_ctx if self.model else None,
            error=self.error,
            parallel=stats.parallel if stats else 1,
            prompt_cache=self.model.prompt_cache() if self.model else None,
            kv_layout=self.model.kv_layout if self.model else None,
            stalled_secs=round(self.worker.stalled_secs(), 1) if self.worker else 0.0,
        )


class ModelManager:
    """Loads, serves and unloads this neuron's models.

    Args:
      pm: the plugin manager with the engines.
      nursery: owns load tasks and generation workers.
      model_dirs: where relative sources resolve.
      memory_budget_mb: what models may use on a CPU-only host.
      n_ctx_max: passed to engines as the cap on a model's context.
      queue_limit: per-model queue bound.
      device_free_mb: free memory per GPU (NVML index -> MiB) from the latest
        sample; empty on a host without GPUs.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        nursery: trio.Nursery,
        *,
        model_dirs: Sequence[str] = (),
        memory_budget_mb: int,
        n_ctx_max: int,
        queue_limit: int,
        device_free_mb: Callable[[], dict[int, int]] = dict,
    ) -> None:
        self._pm = pm
        self._nursery = nursery
        self._model_dirs = tuple(model_dirs)
        self.memory_budget_mb = memory_budget_mb
        self._n_ctx_max = n_ctx_max
        self._queue_limit = queue_limit
        self._device_free_mb = device_free_mb
        self.slots: dict[str, ModelSlot] = {}
        self._activation_pending: list[str] = []
        self._activation_in_progress: list[str] = []
        self._activation_failed: list[ActivationFailure] = []
        self.on_loaded: list[Any] = []
        #: Called with (model id, job) for every job that ran, once it ended.
        self.on_job_finished: list[Callable[[str, Job], None]] = []

    # -- views ------------------------------------------------------------------------

    def statuses(self) -> list[ModelStatus]:
        return [slot.status_view() for slot in self.slots.values()]

    def memory_used_mb(self) -> int:
        return sum(slot.memory_mb for slot in self.slots.values() if slot.status == "loaded")

    def activation(self) -> Activation:
        return Activation(
            in_progress=list(self._activation_in_progress),
            pending=list(self._activation_pending),
            failed=list(self._activation_failed),
        )

    def serving(self, model_id: str) -> ModelSlot:
        """The loaded slot for ``model_id``.

        Raises:
          ModelNotFound: no such model here.
          Unavailable: it is loading, failed or unloading.
        """
        slot = self.slots.get(model_id)
        if slot is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded on this neuron", param="model")
        if slot.status == "loading":
            raise Unavailable(f"model {model_id!r} is still loading", retry_after=2)
        if slot.status == "failed" or slot.unloading or slot.worker is None:
            raise Unavailable(f"model {model_id!r} is not available: {slot.error or 'unloading'}")
        return slot

    @contextlib.contextmanager
    def using(self, model_id: str) -> Iterator[ModelSlot]:
        """The serving slot, held for work done on the model outside its worker.

        Rendering and tokenizing run in threads of their own; an unload waits
        until none is left before it frees the model.
        """
        slot = self.serving(model_id)
        slot.users += 1
        try:
            yield slot
        finally:
            slot.users -= 1
            if not slot.users:
                slot.idle.set()

    # -- loading ----------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ModelSlot:
        """Load a model, or join the load already under way; return when settled.

        Raises:
          CortexError: the load failed (the slot stays, marked failed, unless
            the load was refused for want of memory).
        """
        # A model being unloaded is gone before it loads again: wait for that.
        while (slot := self.slots.get(request.model_id)) is not None and slot.unloading:
            await slot.gone.wait()
        if slot is None or slot.status == "failed":
            slot = ModelSlot(id=request.model_id, status="loading", devices=request.devices)
            self.slots[request.model_id] = slot
            self._nursery.start_soon(self._load, slot, request)
        await slot.settled.wait()
        if slot.status != "loaded":
            raise slot.failure or ModelLoadError(slot.error or "load failed")
        return slot

    async def _load(self, slot: ModelSlot, request: LoadRequest) -> None:
        started = time.perf_counter()
        # Read here, in the trio thread that changes them: iterating the slots
        # from the load thread could race a slot being added.
        free_by_device = self._device_free_mb()
        host_free_mb = self.memory_budget_mb - self.memory_used_mb()
        try:
            model, slot.devices = await trio.to_thread.run_sync(
                self._load_blocking, request, free_by_device, host_free_mb
            )
        except trio.Cancelled:
            slot.status, slot.error = "failed", "neuron shutting down"
            slot.settled.set()
            raise
        except Exception as exc:
            if not isinstance(exc, CortexError):
                log.exception("load of %s failed", request.model_id)
                exc = ModelLoadError(f"cannot load {request.model_id!r}: {type(exc).__name__}")
            log.warning("load of %s failed: %s", request.model_id, exc.message)
            slot.status, slot.error, slot.failure = "failed", exc.message, exc
            slot.settled.set()
            if isinstance(exc, InsufficientMemory) and self.slots.get(slot.id) is slot:
                # Others held the room: nothing wrong with the model, and a
                # gateway may well load it elsewhere. No record of it stays.
                del self.slots[slot.id]
            return
        try:
            slot.model = model
            slot.harness = model.harness
            slot.memory_mb = model.memory_mb()
            slot.worker = GenerationWorker(
                model,
                queue_limit=self._queue_limit,
                on_finished=partial(self._job_finished, slot.id),
            )
            await self._nursery.start(self._run_worker, slot)
        except BaseException:
            # Cancelled (shutdown) after the engine finished loading: free it here,
            # nobody else knows about it yet.
            slot.model = None
            slot.status, slot.error = "failed", "neuron shutting down"
            slot.settled.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(model.unload)
            raise
        slot.status = "loaded"
        slot.loaded_at = time.time()
        slot.settled.set()
        seconds = time.perf_counter() - started
        log.info("loaded %s (%s, %d MiB) in %.2fs", slot.id, slot.harness, slot.memory_mb, seconds)
        for callback in self.on_loaded:
            callback(slot, seconds)

    def _load_blocking(
        self, request: LoadRequest, free_by_device: dict[int, int], host_free_mb: int
    ) -> tuple[LoadedModel, tuple[int, ...]]:
        """Resolve, place and load ``request`` (in a worker thread: touches no shared state).

        Args:
          free_by_device: free MiB per GPU from the latest sample; empty: no GPUs.
          host_free_mb: what the memory budget leaves on a host without GPUs.
        """
        path = sources.resolve(request.source, self._model_dirs)
        chat_format = request.chat_format or sources.DEMO_CHAT_FORMATS.get(request.source)
        options = dict(request.options)
        options.setdefault("n_ctx_max", self._n_ctx_max)
        spec = LoadSpec(
            model_id=request.model_id,
            path=str(path),
            harness=request.harness,
            chat_format=chat_format,
            options=options,
        )
        if free_by_device:
            # A GPU host: the devices asked for, or all of them; the engine
            # fits the context into what they have free, with headroom for
            # compute buffers.
            devices = request.devices or tuple(sorted(free_by_device))
            missing = sorted(set(devices) - set(free_by_device))
            if missing:
                raise InvalidRequest(f"no such devices on this host: {missing}", param="devices")
            budget = sum(free_by_device[d] for d in devices) * 9 // 10
        else:
            devices = ()
            budget = host_free_mb
            # The engine's estimate where it has one (weights, the least
            # context, what it keeps beside them), else the file's size: the
            # figure a gateway makes room for before it asks again, so it
            # must be all the load needs.
            placement = Placement(devices=devices, memory_budget_mb=budget)
            estimate = self._engine_call(
                path, self._pm.hook.cortex_harness_need_mb, spec=spec, placement=placement
            )
            need = max(os.path.getsize(path) // (1024 * 1024), estimate or 0)
            if need > budget:
                # Others hold the room: a distinct answer, so that a gateway
                # can unload some of them and ask again.
                raise InsufficientMemory(
                    f"not enough memory for {request.model_id!r}: needs at least {need} MiB, "
                    f"{budget} MiB of the {self.memory_budget_mb} MiB budget is free",
                    need_mb=need,
                )
        placement = Placement(devices=devices, memory_budget_mb=budget)
        model = self._engine_call(
            path, self._pm.hook.cortex_harness_load, spec=spec, placement=placement
        )
        if model is None:
            raise self._unclaimed(request, Path(path).name)
        return model, devices

    @staticmethod
    def _engine_call(
        path: Path, hook: Callable[..., T], *, spec: LoadSpec, placement: Placement
    ) -> T:
        """Call an engine hook on ``spec``; errors as a client may read them (no paths)."""
        try:
            return hook(spec=spec, placement=placement)
        except CortexError as exc:
            exc.message = _hide_path(exc.message, path)
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {spec.model_id!r}: {_hide_path(str(exc), path)}"
            ) from exc

    def _unclaimed(self, request: LoadRequest, name: str) -> CortexError:
        """Why no engine loaded ``name``: the named one is missing, or none reads it."""
        engines = harness_infos(self._pm)
        if request.harness is not None and request.harness not in {e.name for e in engines}:
            return NoHarness(f"engine {request.harness!r} is not installed here to load {name!r}")
        known = ", ".join(f"{e.name} ({', '.join(e.formats)})" for e in engines) or "none"
        return UnsupportedModelFormat(
            f"no installed engine reads {name!r}: its format is none of theirs (engines: {known})"
        )

    def _job_finished(self, model_id: str, job: Job) -> None:
        for callback in self.on_job_finished:
            callback(model_id, job)

    async def _run_worker(self, slot: ModelSlot, *, task_status: trio.TaskStatus[None]) -> None:
        assert slot.worker is not None
        try:
            await slot.worker.run(task_status=task_status)
        finally:
            slot.worker_done.set()

    # -- unloading --------------------------------------------------------------------

    async def unload(self, model_id: str, *, cancel: bool) -> int:
        """Unload a model: wait for its requests (or cancel them), then free it.

        Returns the number of requests cancelled.

        Raises:
          ModelNotFound: no such model here.
        """
        slot = self.slots.get(model_id)
        if slot is None:
            raise ModelNotFound(
                f"model {model_id!r} is not loaded on this neuron", param="model_id"
            )
        if slot.status == "loading":
            await slot.settled.wait()
        if slot.unloading:
            # Someone else is unloading it; a cancel still applies to what is left.
            cancelled = slot.worker.close(cancel=True) if cancel and slot.worker else 0
            await slot.gone.wait()
            return cancelled
        slot.unloading = True
        # Requests past serving() but not yet submitted either submit now or
        # fail; wait for them before the worker stops taking jobs.
        while slot.users:
            slot.idle = trio.Event()
            await slot.idle.wait()
        cancelled = 0
        if slot.worker is not None:
            cancelled = slot.worker.close(cancel=cancel)
            await slot.worker_done.wait()
        try:
            if slot.model is not None:
                model, slot.model = slot.model, None
                # Shielded: an unload that has begun finishes even if its caller leaves.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(model.unload)
                log.info("unloaded %s (%d cancelled)", model_id, cancelled)
        finally:
            if self.slots.get(model_id) is slot:
                del self.slots[model_id]
            slot.gone.set()
        return cancelled

    async def unload_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for model_id in list(self.slots):
                nursery.start_soon(self._unload_quietly, model_id)

    async def _unload_quietly(self, model_id: str) -> None:
        try:
            await self.unload(model_id, cancel=True)
        except ModelNotFound:
            pass

    # -- activation -------------------------------------------------------------------

    async def activate(self, requests: Sequence[LoadRequest]) -> None:
        """Load the configured models at start, one after another."""
        self._activation_pending = [r.model_id for r in requests]
        for request in requests:
            self._activation_pending.remove(request.model_id)
            self._activation_in_progress.append(request.model_id)
            try:
                await self.load(request)
            except CortexError as exc:
                self._activation_failed.append(ActivationFailure(request.model_id, exc.message))
            finally:
                self._activation_in_progress.remove(request.model_id)


def _hide_path(message: str, path: Path | str) -> str:
    """Keep only the file name of ``path`` in ``message``."""
    full = str(path)
    return message.replace(full, Path(full).name).replace(os.path.dirname(full) + os.sep, "")
