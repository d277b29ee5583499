"""The fleet file: neurons, models and routing settings for a replay (TOML).

::

    [routing]                 # optional: overrides of cortex.toml's [routing]
    max_wait = 300

    [gateway]                 # optional: overrides of cortex.toml's [gateway]
    poll_interval = 10        # (only the timings matter here)

    [[neurons]]
    name = "gpu-a"
    gpus = [24576]            # VRAM per GPU, MiB; leave out for a CPU host ...
    # memory_mb = 65536       # ... and give its memory for models instead
    load_mbps = 2000          # how fast it reads weights into memory, MiB/s
    # activate = ["org/model-8b"]  # loaded when the replay starts (not a cold load)

    [[models]]
    id = "org/model-8b"
    vram_mb = 6000
    # load_seconds = 5        # default: 1 + vram_mb / the neuron's load_mbps
    tokens_per_second = 60    # decode speed of one sequence
    prefill_tokens_per_second = 3000
    slots = 2                 # sequences generated at once
    # host_cache_mb = 512     # the prompt cache's host tier (0: none)
    # kv_kib_per_token = 22.5 # KV state a cached token takes (host tier, restores)
    # restore_mbps = 2000     # how fast a saved state is copied back into a slot

Sizes and speeds are the ones the fake neurons act out; the router is told
only what a real gateway knows (the catalogue's ``vram_mb``, what the
neurons report) and measures the rest. Everything the file leaves out is
the gateway's default, as a real gateway would run with no cortex.toml.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from cortex.config import (
    CatalogModel,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
    RoutingSection,
    read_toml,
    structure,
)
from cortex.errors import ConfigError


@attrs.define
class SimNeuronSpec:
    name: str
    #: VRAM per GPU in MiB; empty: a CPU host with ``memory_mb``.
    gpus: list[int] = attrs.field(factory=list)
    memory_mb: int = 0
    #: MiB/s a load moves into memory.
    load_mbps: float = 2000.0
    #: Models loaded when the replay starts, as a real neuron's activation
    #: list (neuron.toml's ``[[models]]``); not counted as cold loads.
    activate: list[str] = attrs.field(factory=list)


@attrs.define
class SimModelSpec:
    id: str
    vram_mb: int
    #: Seconds a load takes; None: 1 + vram_mb / the neuron's load_mbps.
    load_seconds: float | None = None
    tokens_per_second: float = 50.0
    prefill_tokens_per_second: float = 2000.0
    slots: int = 1
    #: The prompt cache's host tier in MiB (the llama.cpp engine's
    #: ``host_cache_mb``; its default on a GPU host); 0: none.
    host_cache_mb: int = 512
    #: KV state of one token: SmolLM2-135M's 22.5 KiB (``2 x layers x KV
    #: heads x head size x 2 bytes``; an 8B model with GQA takes ~128).
    kv_kib_per_token: float = 22.5
    #: MiB/s a saved state is copied back into a slot: 2150-2800 measured
    #: with llama.cpp's state API on SmolLM2 (a 2000-token state, 44 MiB, in
    #: 16-21 ms, where its prefill took over a minute on the same 2 cores).
    restore_mbps: float = 2000.0
    pinned_on: list[str] = attrs.field(factory=list)
    priority: int = 0

    @property
    def kv_bytes_per_token(self) -> int:
        return round(self.kv_kib_per_token * 1024)

    def restore_time(self, tokens: int) -> float:
        """Seconds to copy ``tokens`` tokens' saved state back into a slot."""
        return tokens * self.kv_bytes_per_token / (self.restore_mbps * 2**20)

    def load_time(self, neuron: SimNeuronSpec) -> float:
        if self.load_seconds is not None:
            return self.load_seconds
        return 1.0 + self.vram_mb / neuron.load_mbps


@attrs.define
class FleetFile:
    neurons: list[SimNeuronSpec]
    models: list[SimModelSpec]
    #: Overrides of cortex.toml's [routing] (policy comes from the command line).
    routing: dict[str, Any] = attrs.field(factory=dict)
    #: Overrides of cortex.toml's [gateway] (poll_interval, load_timeout, ...).
    gateway: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FleetFile:
        """Read and check a fleet file.

        Raises:
          ConfigError: one line naming the file, the key and the reason.
        """
        fleet = structure(cls, read_toml(path), source=str(path))
        names = [n.name for n in fleet.neurons]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"{path}: neurons: names must be present and unique")
        for neuron in fleet.neurons:
            if not neuron.gpus and neuron.memory_mb <= 0:
                raise ConfigError(f"{path}: neurons.{neuron.name}: give gpus or memory_mb")
        ids = [m.id for m in fleet.models]
        if not ids or len(set(ids)) != len(ids):
            raise ConfigError(f"{path}: models: ids must be present and unique")
        for neuron in fleet.neurons:
            for model_id in neuron.activate:
                if model_id not in ids:
                    raise ConfigError(
                        f"{path}: neurons.{neuron.name}.activate: {model_id!r} is not a model"
                    )
        try:
            structure(RoutingSection, fleet.routing, source=str(path))
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} (in [routing])") from None
        try:
            structure(GatewaySection, fleet.gateway, source=str(path))
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} (in [gateway])") from None
        return fleet

    @property
    def memory_mb(self) -> int:
        """Memory for models over the whole fleet."""
        return sum(sum(n.gpus) if n.gpus else n.memory_mb for n in self.neurons)

    def model(self, model_id: str) -> SimModelSpec:
        return next(m for m in self.models if m.id == model_id)

    def catalogue(self) -> ModelsFile:
        """The models.toml a gateway in front of this fleet would have."""
        return ModelsFile(
            models=[
                CatalogModel(
                    id=m.id,
                    vram_mb=m.vram_mb,
                    pinned_on=list(m.pinned_on),
                    priority=m.priority,
                )
                for m in self.models
            ]
        )

    def gateway_config(self, policy: str, **routing: Any) -> GatewayConfig:
        """cortex.toml for the replay: the fleet's [gateway] and [routing], ``policy``, ``routing``.

        What the fleet file leaves out keeps the gateway's defaults.
        """
        settings = {**self.routing, **routing, "policy": policy}
        return GatewayConfig(
            gateway=structure(GatewaySection, self.gateway, source="gateway"),
            routing=structure(RoutingSection, settings, source="routing"),
            neurons=[NeuronEndpoint(n.name, f"http://{n.name}.sim") for n in self.neurons],
        )
