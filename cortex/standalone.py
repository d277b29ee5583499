"""The standalone role: a gateway and a local neuron in one trio process.

The gateway still reaches the neuron over loopback HTTP, so there is one
code path. On shutdown the gateway drains first, then the neuron.
"""

from __future__ import annotations

from functools import partial

import attrs
import trio

from cortex.config import (
    EvictionSection,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronConfig,
    NeuronEndpoint,
    NeuronModel,
    NeuronSection,
    RoutingSection,
    validate_listen,
)

#: The local neuron's name (in metrics, logs, /fleet and models.toml's pinned_on).
LOCAL_NEURON = "local"


@attrs.define
class LocalNeuronSection(NeuronSection):
    """[neuron] in standalone: loopback only, any free port, unless set.

    The gateway is the way in; the local neuron is not exposed by default.
    """

    listen: str = attrs.field(default="127.0.0.1:0", validator=validate_listen)


@attrs.define
class LocalGatewaySection(GatewaySection):
    """[gateway] in standalone: loopback unless set, as single-host tools do.

    One host's own tool should not be reachable from the network (with no
    API keys, by anyone) until its operator says so with ``listen``.
    """

    listen: str = attrs.field(default="127.0.0.1:31313", validator=validate_listen)
    metrics_listen: str = attrs.field(default="127.0.0.1:31314", validator=validate_listen)


@attrs.define
class StandaloneConfig:
    """One file for both halves: [gateway], [eviction], [routing], [neuron], [[models]]."""

    gateway: LocalGatewaySection = attrs.field(factory=LocalGatewaySection)
    eviction: EvictionSection = attrs.field(factory=EvictionSection)
    routing: RoutingSection = attrs.field(factory=RoutingSection)
    neuron: LocalNeuronSection = attrs.field(factory=LocalNeuronSection)
    #: Models the local neuron loads at start.
    models: list[NeuronModel] = attrs.field(factory=list)

    def split(self) -> tuple[NeuronConfig, GatewayConfig]:
        return (
            NeuronConfig(neuron=self.neuron, models=self.models),
            GatewayConfig(gateway=self.gateway, eviction=self.eviction, routing=self.routing),
        )


async def run_standalone(
    config: StandaloneConfig,
    models: ModelsFile,
    *,
    shutdown: trio.Event,
    models_path: str | None = None,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the local neuron, then a gateway whose one neuron it is.

    Reports the gateway's handle once both serve.
    """
    from cortex.gateway.app import run_gateway
    from cortex.neuron.app import run_neuron

    neuron_config, gateway_config = config.split()
    neuron_shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        neuron = await nursery.start(partial(run_neuron, neuron_config, shutdown=neuron_shutdown))
        gateway_config.neurons = [
            NeuronEndpoint(name=LOCAL_NEURON, endpoint=neuron.url, token=config.neuron.token)
        ]
        try:
            await run_gateway(
                gateway_config,
                models,
                shutdown=shutdown,
                models_path=models_path,
                task_status=task_status,
            )
        finally:
            neuron_shutdown.set()
