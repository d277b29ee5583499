"""What every request is served with: the gateway's parts, built once per run.

:class:`Gateway` holds the fleet state, the router, the proxy, the neuron
API client, the metrics and the API keys; ``run_gateway`` builds one, and
both the exchange pipeline (the inference routes) and the control app (the
catalogue, health, admin) serve requests with it. It knows nothing of any
web framework.
"""

from __future__ import annotations

import hmac
from typing import Any

import attrs
import httpx
import trio

from cortex.config import GatewayConfig, ModelsFile, NeuronEndpoint, read_api_keys
from cortex.errors import Unauthorized
from cortex.fleet import make_converter
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.proxy import Proxy
from cortex.gateway.router import Router
from cortex.gateway.state import FleetState
from cortex.gateway.upstream import NeuronAPI

DEFAULT_NEURON = NeuronEndpoint(name="local", endpoint="http://127.0.0.1:13131")

#: Seconds a small neuron call (discovery, health, models) may take.
CALL_TIMEOUT = 10.0

#: The reply-limit fields of the endpoints whose absent limit means "the
#: whole context" (completions' absent max_tokens means 16, as OpenAI's).
MAX_TOKENS_KEYS = {
    "chat/completions": ("max_tokens", "max_completion_tokens"),
    "responses": ("max_output_tokens",),
}


@attrs.define(eq=False)
class Gateway:
    """Everything a request handler needs, built once per ``run_gateway``."""

    config: GatewayConfig
    state: FleetState
    api: NeuronAPI
    router: Router
    proxy: Proxy
    metrics: GatewayMetrics
    api_keys: frozenset[str]
    #: models.toml, re-read by SIGHUP and POST /admin/reload; None: nothing to re-read.
    models_path: str | None = None

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        models: ModelsFile,
        client: httpx.AsyncClient,
        *,
        metrics: GatewayMetrics | None = None,
    ) -> Gateway:
        section = config.gateway
        if not config.neurons:
            config = attrs.evolve(config, neurons=[DEFAULT_NEURON])
        metrics = metrics or GatewayMetrics.create()
        state = FleetState.build(config.neurons, models)
        api = NeuronAPI(
            client=client,
            converter=make_converter(),
            call_timeout=httpx.Timeout(CALL_TIMEOUT, connect=section.connect_timeout),
            load_timeout=httpx.Timeout(section.load_timeout, connect=section.connect_timeout),
        )
        router = Router(config=config, state=state, api=api, metrics=metrics)
        proxy = Proxy(router=router, section=section, metrics=metrics)
        return cls(
            config=config,
            state=state,
            api=api,
            router=router,
            proxy=proxy,
            metrics=metrics,
            api_keys=read_api_keys(section),
        )

    async def ready(self) -> None:
        """Wait (briefly) for the first poll of every neuron after start.

        At once, not a checkpoint, once they have been polled (every request
        passes here).
        """
        if self.state.all_polled():
            return
        with trio.move_on_after(CALL_TIMEOUT + self.config.gateway.connect_timeout):
            await self.state.wait_polled()

    def check_key(self, x_api_key: str | None, authorization: str | None) -> None:
        """Accept the request's key, or raise ``Unauthorized`` (no keys set: all pass).

        Either header may carry it: a wrong ``x-api-key`` (an SDK's
        default, say) does not hide a good ``Authorization: Bearer``.
        """
        if not self.api_keys:
            return
        offered = [x_api_key] if x_api_key else []
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            offered.append(value.strip())
        if not any(self._known_key(key) for key in offered):
            raise Unauthorized(
                "missing or invalid API key (send Authorization: Bearer KEY or x-api-key: KEY)"
            )

    def _known_key(self, key: str) -> bool:
        # Constant time, and against every key: how long this takes says
        # nothing of how much of a key matched, nor which.
        given = key.encode()
        found = False
        for known in self.api_keys:
            found |= hmac.compare_digest(given, known.encode())
        return found

    def apply_defaults(self, model_id: str, body: dict[str, Any], endpoint: str) -> bool:
        """Fill the catalogue's default sampling, and the default reply limit of
        chat-shaped requests, into ``body``; True if it changed."""
        entry = self.state.catalogue.models.get(model_id)
        changed = False
        cap = self.config.gateway.default_max_tokens
        if cap is not None and endpoint in MAX_TOKENS_KEYS:
            keys = MAX_TOKENS_KEYS[endpoint]
            if all(body.get(key) is None for key in keys):
                body[keys[0]] = cap
                changed = True
        for key, value in (entry.sampling if entry is not None else {}).items():
            if body.get(key) is None:
                # The catalogue holds floats; top_k is an integer on the wire.
                body[key] = int(value) if key == "top_k" else value
                changed = True
        return changed
