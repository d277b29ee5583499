"""Fake neurons in process, and the ``NeuronLink`` the router drives them through.

A :class:`SimNeuron` holds models in device (or host) memory, loads one in
the time its fleet file gives, unloads once its requests are done, and
generates with up to ``slots`` sequences at once per model: a request waits
for a slot, is seated by the model's prompt cache (:mod:`cortex.sim.cache`:
the slot holding its longest prefix, or a state restored from the host
tier), then takes its uncached prompt tokens over
``prefill_tokens_per_second`` (plus the restore's copy at ``restore_mbps``)
to its first token, then decodes ``max_tokens`` in a batch with the model's
other sequences (:class:`Decoder`): batched decode is faster in all but
slower per sequence, along :data:`BATCH_SPEEDUP`. The cache goes with the
model when it is unloaded. It refuses a load that does not fit
beside what is loaded and what is loading, as a real neuron's memory would.
All of it is ``trio.sleep``: under a ``MockClock`` it costs no real time.

It answers what a real neuron's ``/discovery``, ``/health`` and ``/models``
would, as the same types (``cortex.fleet``), through :class:`SimLink`, so
the gateway's pollers and router see it as they would a real one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import attrs
import trio

from cortex.errors import ModelNotFound, Unavailable
from cortex.fleet import (
    Activation,
    Cpu,
    Device,
    DeviceSample,
    Discovery,
    Health,
    MemoryBudget,
    ModelStatus,
)
from cortex.gateway.state import NeuronState
from cortex.sim.cache import PromptCache, Runs, length
from cortex.sim.fleet import SimModelSpec, SimNeuronSpec

#: Seconds an unload takes once the model is idle.
UNLOAD_SECONDS = 0.5
#: Aggregate decode throughput of one model against the number of sequences
#: it decodes at once, over its single-sequence speed: a batched llama.cpp
#: neuron as contrib/bench/concurrency.py measures it (rounded, and the
#: same for every model). Between the points it is linear, past the last flat.
BATCH_SPEEDUP = ((1, 1.0), (2, 1.6), (4, 2.0), (8, 2.4))


def batch_speedup(streams: int) -> float:
    """Aggregate decode throughput at ``streams`` sequences, in single-sequence units."""
    if streams <= 1:
        return 1.0
    for (n0, x0), (n1, x1) in itertools.pairwise(BATCH_SPEEDUP):
        if streams <= n1:
            return x0 + (x1 - x0) * (streams - n0) / (n1 - n0)
    return BATCH_SPEEDUP[-1][1]


@attrs.define(eq=False)
class Decoder:
    """The sequences one loaded model decodes together.

    Each sequence advances at ``tokens_per_second * batch_speedup(n) / n``
    for the ``n`` sequences decoding at that moment: whenever one joins or
    leaves, every one's progress is brought up to date and its end
    recomputed. Prefill is not part of it (it runs at its own speed).
    """

    tokens_per_second: float
    #: Each sequence decoding (a key per sequence) -> tokens it has left.
    left: dict[object, float] = attrs.field(factory=dict)
    updated: float = 0.0
    changed: trio.Event = attrs.field(factory=trio.Event)

    def per_sequence(self) -> float:
        streams = max(1, len(self.left))
        return self.tokens_per_second * batch_speedup(streams) / streams

    def _advance(self) -> None:
        now = trio.current_time()
        if self.left:
            done = (now - self.updated) * self.per_sequence()
            for key in self.left:
                self.left[key] -= done
        self.updated = now

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def decode(self, tokens: int) -> None:
        """Return once ``tokens`` are decoded, at the batch's speed as it changes."""
        self._advance()
        key = object()
        self.left[key] = float(tokens)
        self._kick()
        try:
            while True:
                self._advance()
                # Within a millionth of a token: float rounding, not work left.
                if self.left[key] <= 1e-6:
                    return
                with trio.move_on_after(self.left[key] / self.per_sequence()):
                    await self.changed.wait()
        finally:
            self._advance()
            del self.left[key]
            self._kick()


@attrs.define(eq=False)
class Resident:
    """A model loaded on a fake neuron."""

    spec: SimModelSpec
    devices: list[int]
    loaded_at: float
    slots: trio.CapacityLimiter
    last_used: float | None = None
    in_flight: int = 0
    queued: int = 0
    idle: trio.Event = attrs.field(factory=trio.Event)
    decoder: Decoder = attrs.field(init=False)
    cache: PromptCache = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.decoder = Decoder(self.spec.tokens_per_second)
        self.cache = PromptCache(
            slots=self.spec.slots,
            budget_bytes=self.spec.host_cache_mb * 2**20,
            kv_bytes_per_token=self.spec.kv_bytes_per_token,
        )

    def memory(self, gpu: bool) -> dict[int, int]:
        if not gpu:
            return {-1: self.spec.vram_mb}
        share = math.ceil(self.spec.vram_mb / len(self.devices))
        return dict.fromkeys(self.devices, share)


@attrs.frozen
class Generation:
    """When a request got its slot, its first token and its last (trio time)."""

    slot_at: float
    first_token_at: float
    done_at: float
    completion_tokens: int
    #: Prompt tokens read from the prompt cache (slot and host tier).
    cached_tokens: int = 0
    #: ... of which restored from the host tier.
    restored_tokens: int = 0


@attrs.define(eq=False)
class SimNeuron:
    spec: SimNeuronSpec
    models: dict[str, SimModelSpec]
    #: The fleet's wall clock (virtual): what ``loaded_at`` and ``last_used`` use.
    clock: Callable[[], float]
    resident: dict[str, Resident] = attrs.field(factory=dict)
    loading: dict[str, trio.Event] = attrs.field(factory=dict)
    #: Memory each load in progress takes, per device (or -1: host memory).
    reserved: dict[str, dict[int, int]] = attrs.field(factory=dict)
    #: Loads and unloads done, and loads refused for want of memory, for the
    #: report: (trio time, "load" | "unload" | "refused", model).
    log: list[tuple[float, str, str]] = attrs.field(factory=list)
    #: Cached prompt tokens (slots and host tier) that unloads threw away.
    dropped_tokens: int = 0
    #: Names of token runs no other prompt shares.
    _unique: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    @property
    def gpu(self) -> bool:
        return bool(self.spec.gpus)

    def used(self, *, loading: bool = False) -> dict[int, int]:
        """Memory held by loaded models (and with ``loading``, by loads in progress)."""
        used = dict.fromkeys(range(len(self.spec.gpus)), 0) if self.gpu else {-1: 0}
        held = [r.memory(self.gpu) for r in self.resident.values()]
        if loading:
            held += self.reserved.values()
        for memory in held:
            for index, mb in memory.items():
                used[index] = used.get(index, 0) + mb
        return used

    def total(self) -> dict[int, int]:
        return dict(enumerate(self.spec.gpus)) if self.gpu else {-1: self.spec.memory_mb}

    # -- what a neuron reports --------------------------------------------------------

    def discovery(self) -> Discovery:
        return Discovery(
            hostname=self.spec.name,
            os="sim",
            kernel="sim",
            cpu=Cpu(model="sim", cores=16),
            ram_total_mb=self.spec.memory_mb or 65536,
            devices=[
                Device(i, f"SIM-{self.spec.name}-{i}", "Sim GPU", vram, "9.0")
                for i, vram in enumerate(self.spec.gpus)
            ],
        )

    def health(self) -> Health:
        used, total = self.used(), self.total()
        return Health(
            uptime_secs=trio.current_time(),
            devices=[
                DeviceSample(i, used[i], total[i] - used[i]) for i in range(len(self.spec.gpus))
            ],
            memory=MemoryBudget(
                total_mb=self.spec.memory_mb or 65536,
                used_mb=0 if self.gpu else used[-1],
            ),
            activation=Activation(),
            queue_depth=sum(r.queued for r in self.resident.values()),
            in_flight=sum(r.in_flight for r in self.resident.values()),
        )

    def statuses(self) -> list[ModelStatus]:
        out = [
            ModelStatus(
                id=model_id,
                harness="sim",
                status="loaded",
                devices=list(r.devices),
                memory_mb=r.spec.vram_mb,
                loaded_at=r.loaded_at,
                last_used=r.last_used,
                in_flight=r.in_flight,
                queued=r.queued,
                parallel=r.spec.slots,
                prompt_cache=r.cache.statistics(),
            )
            for model_id, r in self.resident.items()
        ]
        out += [ModelStatus(id=m, harness="sim", status="loading") for m in self.loading]
        return out

    def status(self, model_id: str) -> ModelStatus:
        return next(s for s in self.statuses() if s.id == model_id)

    # -- what a neuron does -----------------------------------------------------------

    def activate(self) -> None:
        """Load the models of the spec's ``activate`` list at once (before a replay starts).

        Raises:
          Unavailable: one does not fit beside the others.
        """
        for model_id in self.spec.activate:
            spec = self.models[model_id]
            resident = Resident(
                spec, [0] if self.gpu else [], self.clock(), trio.CapacityLimiter(1)
            )
            used, total = self.used(), self.total()
            if any(used[i] + mb > total[i] for i, mb in resident.memory(self.gpu).items()):
                raise Unavailable(f"{model_id} does not fit on {self.spec.name} at start")
            resident.slots = trio.CapacityLimiter(max(1, spec.slots))
            resident.idle.set()
            self.resident[model_id] = resident

    async def load(self, model_id: str, devices: list[int]) -> ModelStatus:
        """Load ``model_id`` on ``devices``; join a load of it already under way.

        Raises:
          ModelNotFound: not a model of the fleet file.
          Unavailable: it does not fit beside the models loaded and loading.
        """
        if model_id in self.resident:
            return self.status(model_id)
        if model_id in self.loading:
            await self.loading[model_id].wait()
            if model_id not in self.resident:
                raise Unavailable(f"loading {model_id} on {self.spec.name} failed")
            return self.status(model_id)
        spec = self.models.get(model_id)
        if spec is None:
            raise ModelNotFound(f"{model_id} is not a model of this fleet")
        if self.gpu and not devices:
            devices = [0]
        need = Resident(spec, devices, 0.0, trio.CapacityLimiter(1)).memory(self.gpu)
        used, total = self.used(loading=True), self.total()
        if any(used.get(i, 0) + mb > total.get(i, 0) for i, mb in need.items()):
            self.log.append((trio.current_time(), "refused", model_id))
            raise Unavailable(f"no memory for {model_id} on {self.spec.name}")
        done = self.loading[model_id] = trio.Event()
        self.reserved[model_id] = need
        try:
            await trio.sleep(spec.load_time(self.spec))
            self.resident[model_id] = Resident(
                spec=spec,
                devices=devices,
                loaded_at=self.clock(),
                slots=trio.CapacityLimiter(max(1, spec.slots)),
            )
            self.resident[model_id].idle.set()
            self.log.append((trio.current_time(), "load", model_id))
        finally:
            del self.loading[model_id]
            del self.reserved[model_id]
            done.set()
        return self.status(model_id)

    async def unload(self, model_id: str) -> None:
        """Unload ``model_id`` once its requests are done.

        Raises:
          ModelNotFound: it is not loaded here.
        """
        resident = self.resident.get(model_id)
        if resident is None:
            raise ModelNotFound(f"{model_id} is not loaded on {self.spec.name}")
        while resident.in_flight or resident.queued:
            await resident.idle.wait()
        await trio.sleep(UNLOAD_SECONDS)
        if self.resident.get(model_id) is resident:
            del self.resident[model_id]
            self.dropped_tokens += resident.cache.held_tokens()
            self.log.append((trio.current_time(), "unload", model_id))

    async def generate(
        self,
        model_id: str,
        prompt_tokens: int,
        max_tokens: int,
        *,
        prompt: Runs | None = None,
        answer: str | None = None,
    ) -> Generation:
        """Serve one request to its last token: a slot, prefill, batched decode.

        ``prompt``: its token runs (``cortex.sim.cache``; ``prompt_tokens``
        is then their length); None: tokens no other prompt shares.
        ``answer``: the name of the run its completion is (a later prompt
        that repeats the answer shares it); None: tokens of its own.

        Raises:
          ModelNotFound: the model is not loaded here (as a real neuron's 404).
        """
        resident = self.resident.get(model_id)
        if resident is None:
            raise ModelNotFound(f"model {model_id} is not loaded on {self.spec.name}")
        if resident.idle.is_set():
            resident.idle = trio.Event()
        resident.queued += 1
        try:
            try:
                await resident.slots.acquire()
            finally:
                resident.queued -= 1
            resident.in_flight += 1
            seat = None
            try:
                slot_at = trio.current_time()
                resident.last_used = self.clock()
                spec = resident.spec
                if prompt is None:
                    prompt = ((f"{self.spec.name}-{next(self._unique)}", prompt_tokens),)
                prompt_tokens = length(prompt)
                seat = resident.cache.seat(prompt)
                await trio.sleep(
                    (prompt_tokens - seat.cached) / spec.prefill_tokens_per_second
                    + spec.restore_time(seat.host_tokens)
                )
                first = trio.current_time()
                await resident.decoder.decode(max_tokens)
                resident.last_used = self.clock()
                return Generation(
                    slot_at,
                    first,
                    trio.current_time(),
                    max_tokens,
                    cached_tokens=seat.cached,
                    restored_tokens=seat.host_tokens,
                )
            finally:
                if seat is not None:
                    output = (answer or f"{self.spec.name}-{next(self._unique)}", max_tokens)
                    resident.cache.done(seat, (*prompt, output))
                resident.in_flight -= 1
                resident.slots.release()
        finally:
            if not (resident.in_flight or resident.queued):
                resident.idle.set()


@attrs.define(eq=False)
class SimLink:
    """``cortex.gateway.upstream.NeuronLink`` over :class:`SimNeuron` s, in process."""

    neurons: dict[str, SimNeuron]

    async def discovery(self, neuron: NeuronState) -> Discovery:
        await trio.lowlevel.checkpoint()
        return self.neurons[neuron.name].discovery()

    async def health(self, neuron: NeuronState) -> Health:
        await trio.lowlevel.checkpoint()
        return self.neurons[neuron.name].health()

    async def models(self, neuron: NeuronState) -> list[ModelStatus]:
        await trio.lowlevel.checkpoint()
        return self.neurons[neuron.name].statuses()

    async def load(self, neuron: NeuronState, body: dict[str, object]) -> ModelStatus | None:
        devices = body.get("devices") or []
        assert isinstance(devices, list)
        return await self.neurons[neuron.name].load(str(body["model_id"]), devices)

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        await self.neurons[neuron.name].unload(model_id)
