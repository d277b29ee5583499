"""The gateway role: one OpenAI + Anthropic API in front of the fleet's neurons.

Modules: ``app`` (HTTP API, ``run_gateway``), ``state`` (the fleet as last
seen, placement), ``poller`` (one task per neuron), ``router`` (model ->
neuron, cold loads), ``evictor`` (what to unload), ``proxy`` (sending and
relaying), ``upstream`` (the neuron API client), ``metrics``.
"""

from cortex.gateway.app import GatewayHandle, create_app, run_gateway

__all__ = ["GatewayHandle", "create_app", "run_gateway"]
