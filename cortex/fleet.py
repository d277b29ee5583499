"""Types both roles exchange over HTTP: devices, discovery, health, model status.

The neuron builds them and unstructures them to JSON; the gateway structures
the JSON back (unknown keys are ignored there, so a newer neuron can add
fields without breaking an older gateway).
"""

from __future__ import annotations

from typing import Literal

import attrs
import cattrs

from cortex.harness import HarnessInfo, PromptCacheStatistics

ModelState = Literal["loaded", "loading", "failed"]


@attrs.frozen
class Device:
    index: int
    uuid: str
    name: str
    vram_total_mb: int
    compute_capability: str


@attrs.frozen
class DeviceSample:
    index: int
    vram_used_mb: int
    vram_free_mb: int
    utilization_pct: int | None = None
    temp_c: int | None = None


@attrs.frozen
class Cpu:
    model: str
    cores: int


@attrs.frozen
class Discovery:
    hostname: str
    os: str
    kernel: str
    cpu: Cpu
    ram_total_mb: int
    cuda_version: str | None = None
    driver_version: str | None = None
    devices: list[Device] = attrs.field(factory=list)
    harnesses: list[HarnessInfo] = attrs.field(factory=list)


@attrs.frozen
class MemoryBudget:
    """Host memory for models on a CPU-only host (the configured cap)."""

    total_mb: int
    used_mb: int

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)


@attrs.frozen
class ActivationFailure:
    model_id: str
    error: str


@attrs.frozen
class Activation:
    in_progress: list[str] = attrs.field(factory=list)
    pending: list[str] = attrs.field(factory=list)
    failed: list[ActivationFailure] = attrs.field(factory=list)


@attrs.frozen
class Health:
    uptime_secs: float
    devices: list[DeviceSample]
    memory: MemoryBudget
    activation: Activation
    #: Requests waiting for a generation worker, over all models.
    queue_depth: int = 0
    #: Requests being generated, over all models.
    in_flight: int = 0
    #: Shutting down: it finishes the requests it has and refuses new work
    #: (503); it stops listening once they are done or its grace period ends.
    draining: bool = False


@attrs.frozen
class ModelStatus:
    id: str
    harness: str | None
    status: ModelState
    devices: list[int] = attrs.field(factory=list)
    memory_mb: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    in_flight: int = 0
    queued: int = 0
    n_ctx: int | None = None
    error: str | None = None
    #: Requests the model generates at once (the engine's ``parallel``).
    parallel: int = 1
    #: The engine's prompt cache (slots and host tier), when it keeps one.
    prompt_cache: PromptCacheStatistics | None = None
    #: The engine's KV layout ("unified", "per-slot"), when it says.
    kv_layout: str | None = None
    #: Seconds the model has had requests running without its engine's
    #: progress count moving (``LoadedModel.progress``); 0 while it moves,
    #: while idle, and for engines that do not count.
    stalled_secs: float = 0.0


def make_converter(*, strict: bool = False) -> cattrs.Converter:
    """A converter for these types; ``strict`` forbids unknown keys."""
    converter = cattrs.Converter(forbid_extra_keys=strict)

    # MemoryBudget.free_mb is derived; send it so clients need not compute it.
    def unstructure_memory(memory: MemoryBudget) -> dict[str, int]:
        return {"total_mb": memory.total_mb, "used_mb": memory.used_mb, "free_mb": memory.free_mb}

    def structure_memory(data: dict[str, int], _: type) -> MemoryBudget:
        return MemoryBudget(total_mb=int(data["total_mb"]), used_mb=int(data["used_mb"]))

    converter.register_unstructure_hook(MemoryBudget, unstructure_memory)
    converter.register_structure_hook(MemoryBudget, structure_memory)
    return converter
