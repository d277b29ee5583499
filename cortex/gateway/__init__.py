"""The gateway role: one OpenAI + Anthropic API in front of the fleet's neurons.

Modules: ``app`` (the ASGI app, the control routes, ``run_gateway``),
``context`` (what every request is served with), ``exchange`` (the one
pipeline of every inference route), ``dialects`` (what each route reads
and writes), ``proxy`` (routing a request to a neuron, retries, finishing)
over ``hop`` (HTTP/1.1 to neurons), ``state`` (the fleet as last seen,
placement), ``poller`` (one task per neuron), ``router`` (model -> neuron,
cold loads), ``evictor`` (what to unload), ``upstream`` (the neuron API
client), ``metrics``.
"""

from cortex.gateway.app import GatewayHandle, create_app, run_gateway

__all__ = ["GatewayHandle", "create_app", "run_gateway"]
