"""The gateway: its ASGI app, and ``run_gateway`` that owns every task.

``run_gateway`` opens one nursery holding the API server, the metrics
server, one poller per neuron, and the router's ``Loader`` (the model
loads, evictions and scale-ins the router decides on) with its
``Preloader`` (pinned models loaded where they are pinned); it
reports a :class:`GatewayHandle` once both servers are bound and returns
after ``shutdown`` is set and in-flight requests have drained.

The API is two apps, one in front of the other (``create_app``): the
exchange pipeline (``cortex.gateway.exchange``) serves the inference routes
of both dialects, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/messages`` and ``/v1/messages/count_tokens``; the
control app here, on Quart, serves the rest: ``/v1/models``, ``/fleet``,
``/health`` and ``POST /admin/reload``. Errors come in the caller's
dialect: Anthropic's envelope under ``/v1/messages`` and for a client that
sends ``anthropic-version`` (``/v1/models`` answers it in Anthropic's shape
too), OpenAI's everywhere else.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from cortex.config import GatewayConfig, ModelsFile
from cortex.errors import (
    ConfigError,
    CortexError,
    InvalidCatalogue,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    Unauthorized,
)
from cortex.gateway.context import CALL_TIMEOUT, Gateway
from cortex.gateway.exchange import Pipeline, error_dialect, new_request_id
from cortex.gateway.fleetview import fleet_view, location_status
from cortex.gateway.metrics import UNKNOWN, GatewayMetrics
from cortex.gateway.poller import poll_neuron
from cortex.gateway.reload import reload_gateway
from cortex.gateway.state import FAILED, LOADED, LOADING, FleetState, feasible
from cortex.serve import bound_url, is_loopback, serve
from cortex.wire import anthropic, openai
from cortex.wire.envelope import ANTHROPIC, error_parts, framework_error, id_headers

log = logging.getLogger(__name__)

DEFAULT_PORT = 31313
DEFAULT_METRICS_PORT = 31314

#: Seconds the requests cut at the end of ``grace_period`` get to send their
#: error answer before the server closes their connections.
STOP_MARGIN = 1.0


@attrs.frozen
class GatewayHandle:
    """What ``run_gateway`` reports once it is serving."""

    api_url: str
    metrics_url: str
    state: FleetState
    gateway: Gateway = attrs.field(repr=False)

    async def reload(self) -> None:
        """What SIGHUP does: ``reload_gateway`` (see ``cortex.gateway.reload``).

        Raises:
          ConfigError: a file is bad; the old catalogue and keys stay.
        """
        if self.gateway.models_path is None and not self.gateway.config.gateway.api_keys_file:
            log.info("SIGHUP: no --models file nor api_keys_file to re-read")
            return
        await reload_gateway(self.gateway)


def _request_id() -> str:
    return request.headers.get("x-request-id") or new_request_id()


def authenticate(gateway: Gateway) -> None:
    """``Gateway.check_key`` on the current Quart request."""
    gateway.check_key(request.headers.get("x-api-key"), request.headers.get("authorization"))


def authenticated(gateway: Gateway) -> bool:
    """Whether the current Quart request may see what keys guard (no keys set: yes)."""
    try:
        authenticate(gateway)
    except Unauthorized:
        return False
    return True


def client_dialect() -> str:
    """The current Quart request's dialect: ``error_dialect`` by its path, but
    Anthropic's for a client that sends ``anthropic-version`` (Anthropic's API
    requires it: every Anthropic SDK does, no OpenAI one) on a shared route."""
    if request.headers.get("anthropic-version") is not None:
        return ANTHROPIC
    return error_dialect(request.path)


def error_response(exc: CortexError, *, dialect: str | None = None) -> Response:
    """``exc`` in ``dialect`` (None: ``client_dialect()``), with Retry-After where it applies."""
    dialect = dialect or client_dialect()
    status, body, headers = error_parts(exc, dialect=dialect, request_id=_request_id())
    response = Response(body, status=status, content_type="application/json")
    for name, value in headers:
        response.headers[name] = value
    return response


async def drain_body() -> None:
    """Read the current Quart request's body before anything answers it.

    A view that answers without reading the body (a 401, a 403) leaves the
    keep-alive connection's next request hanging now and then under
    quart-trio and hypercorn; read (and cache) it first, within
    MAX_CONTENT_LENGTH (413 beyond).
    """
    await request.get_data()


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def create_app(gateway: Gateway) -> Pipeline:
    """The gateway's ASGI app (hypercorn on trio serves it).

    The exchange pipeline answers the inference routes without a web
    framework; every other request goes to the Quart control app.
    """
    control = _control_app(gateway)
    routes = control.url_map.bind("localhost")
    return Pipeline(gateway, control, lambda path: sorted(routes.allowed_methods(path)))


def _control_app(gateway: Gateway) -> QuartTrio:
    """The catalogue, health and admin routes: everything but inference."""
    app = QuartTrio("cortex.gateway")
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.gateway.max_body_bytes
    state = gateway.state

    @app.before_request
    async def read_whole_body() -> None:
        await drain_body()

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return error_response(framework_error(exc, request.method, request.path))

    # -- the catalogue and health ---------------------------------------------------

    @app.get("/")
    async def root() -> Response:
        """A liveness answer (HEAD too): Claude Code sends ``HEAD /`` before its first turn."""
        return _json({"status": "ok", "service": "cortex gateway"})

    def models_answer(body: dict[str, Any]) -> Response:
        response = _json(body)
        if client_dialect() == ANTHROPIC:
            for name, value in id_headers(_request_id(), ANTHROPIC):
                response.headers[name] = value
        return response

    @app.get("/v1/models")
    async def list_models() -> Response:
        """OpenAI's list, or Anthropic's paged one (``limit``, ``after_id``, ``before_id``)."""
        try:
            authenticate(gateway)
            await gateway.ready()
            entries = model_entries(gateway)
            if client_dialect() == ANTHROPIC:
                return models_answer(anthropic.model_page(entries, request.args))
        except CortexError as exc:
            return error_response(exc)
        return _json(openai.model_list(entries))

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        try:
            authenticate(gateway)
            for entry in model_entries(gateway):
                if entry["id"] == model_id:
                    if client_dialect() == ANTHROPIC:
                        return models_answer(anthropic.model_info(entry))
                    return _json(entry)
            raise _not_found(model_id)
        except CortexError as exc:
            return error_response(exc)

    @app.post("/admin/reload")
    async def admin_reload() -> Response:
        try:
            # Admin routes exist only behind keys: an open gateway has no admin.
            if not gateway.api_keys:
                raise PermissionDenied("POST /admin/reload needs [gateway] api_keys to be set")
            authenticate(gateway)
            if gateway.models_path is None and not gateway.config.gateway.api_keys_file:
                raise InvalidRequest(
                    "the gateway was started without --models nor an api_keys_file: "
                    "nothing to reload"
                )
            try:
                catalogue = await reload_gateway(gateway)
            except ConfigError as exc:
                # The request is fine; the server's file is not.
                raise InvalidCatalogue(f"kept the old catalogue: {exc.message}") from None
        except CortexError as exc:
            return error_response(exc)
        return _json(
            {
                "status": "reloaded",
                "models": len(catalogue.models),
                "aliases": len(catalogue.aliases),
                "tiers": len(catalogue.tiers),
            }
        )

    @app.get("/fleet")
    async def fleet() -> Response:
        try:
            authenticate(gateway)
        except CortexError as exc:
            return error_response(exc)
        await gateway.ready()
        return _json(fleet_view(state))

    @app.get("/health")
    async def health() -> Response:
        """Up or down for anyone; endpoints, errors and models behind the API keys.

        Health checkers need no key, but endpoints and transport errors
        name internal addresses.
        """
        # A draining neuron is up but takes nothing new: not "ok".
        serving = sum(1 for n in state.neurons.values() if n.up and not n.draining)
        status = "ok" if serving == len(state.neurons) else "degraded" if serving else "down"
        if not authenticated(gateway):
            brief = [
                {"name": n.name, "up": n.up, "draining": n.draining} for n in state.neurons.values()
            ]
            return _json({"status": status, "neurons": brief})
        neurons = [
            {
                "name": n.name,
                "endpoint": n.endpoint,
                "up": n.up,
                "suspect": n.suspect,
                "draining": n.draining,
                "last_seen": n.last_seen,
                "error": n.last_error,
                "models": {m: location_status(state, n, m) for m in n.models},
                "loading": sorted(
                    load.model_id for (name, _), load in state.pending.items() if name == n.name
                ),
            }
            for n in state.neurons.values()
        ]
        return _json({"status": status, "neurons": neurons})

    return app


def _not_found(model_id: str) -> CortexError:
    return ModelNotFound(f"model {model_id!r} does not exist", param="model")


def model_entries(gateway: Gateway) -> list[dict[str, Any]]:
    """``/v1/models`` data: catalogue, then models only neurons know, then aliases."""
    state = gateway.state
    ids = list(state.catalogue.models)
    for neuron in state.neurons.values():
        if neuron.up:
            # A failed load's record (another gateway's) is nothing to ask for.
            ids += [m for m in neuron.models if m not in ids and state.holds(neuron, m)]

    def describe(model_id: str) -> dict[str, Any]:
        locations = []
        created = int(state.started_at)
        # The context a neuron runs it with; the smallest where replicas differ.
        contexts: list[int] = []
        for neuron in state.neurons.values():
            if not neuron.up:
                continue
            status = neuron.status_of(model_id)
            if (neuron.name, model_id) in state.pending and status != LOADED:
                status = LOADING
            if status is not None:
                locations.append({"neuron": neuron.name, "status": status})
            loaded = neuron.models.get(model_id)
            if loaded is not None and loaded.loaded_at:
                created = min(created, int(loaded.loaded_at))
            if loaded is not None and loaded.status == LOADED and loaded.n_ctx:
                contexts.append(loaded.n_ctx)
        entry = state.catalogue.models.get(model_id)
        configured = entry.options.get("n_ctx") if entry is not None else None
        if not contexts and isinstance(configured, int) and configured > 0:
            contexts.append(configured)  # 0 is the engine's "the model's own": unknown here
        # Both names: IDE plugins (Continue) read context_length, vLLM's clients
        # max_model_len. Unknown (no neuron has it, no n_ctx in its entry): absent.
        context = (
            {"context_length": min(contexts), "max_model_len": min(contexts)} if contexts else {}
        )
        feasible_on = (
            [n.name for n in state.neurons.values() if feasible(entry, n)] if entry else []
        )
        statuses = {loc["status"] for loc in locations}
        failed_on = {loc["neuron"] for loc in locations if loc["status"] == FAILED}
        status = next((s for s in (LOADED, LOADING) if s in statuses), None)
        # A neuron refused its entry: requests fail at once until a reload
        # (unless a replica is loaded or loading, which they go to).
        invalid = state.invalid(model_id) if status is None else None
        if invalid is not None:
            status = "invalid"
        elif status is None:
            # A load that failed on one neuron never hides a model another can load.
            if set(feasible_on) - failed_on:
                status = "available"
            else:
                status = FAILED if failed_on else "unavailable"
        return {
            "created": created,
            "loaded": status == LOADED,
            "status": status,
            "locations": locations,
            "feasible_on": feasible_on,
            **({"error": invalid} if invalid is not None else {}),
            **context,
        }

    described = {model_id: describe(model_id) for model_id in ids}
    entries = [openai.model_entry(model_id, **fields) for model_id, fields in described.items()]
    for alias, target in state.catalogue.aliases.items():
        fields = described.get(target) or describe(target)
        entries.append(openai.model_entry(alias, alias_of=target, **fields))
    for tier, members in state.catalogue.tiers.items():
        # A tier shows the member a request would be routed to now.
        target = gateway.router.resolve(tier)
        fields = described.get(target) or describe(target)
        entries.append(openai.model_entry(tier, alias_of=target, tier=members, **fields))
    return entries


def _metrics_app(metrics: GatewayMetrics) -> Any:
    """prometheus-client's ASGI app on ``/metrics``, plus the lifespan protocol hypercorn speaks.

    Any other path is a plain 404 naming it, as a neuron answers: prometheus-client
    serves every path, so a ``[[neurons]]`` entry pointed at this port by mistake
    would read metrics text as its ``/discovery``.
    """
    inner = metrics.asgi_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            if scope["path"] == "/metrics":
                await inner(scope, receive, send)
                return
            body = f"not found: {scope['path']} (the metrics are on /metrics)\n".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

    return app


def log_start(gateway: Gateway, api_url: str, metrics_url: str) -> None:
    """The start line (the addresses bound), and a warning for an open API beyond loopback."""
    section = gateway.config.gateway
    log.info(
        "gateway on %s (metrics %s), %d neuron(s)",
        bound_url(section.listen, api_url, default_port=DEFAULT_PORT),
        bound_url(section.metrics_listen, metrics_url, default_port=DEFAULT_METRICS_PORT),
        len(gateway.state.neurons),
    )
    if not gateway.api_keys and not is_loopback(section.listen, default_port=DEFAULT_PORT):
        log.warning(
            "the API listens on %s with no API keys: anyone who can reach it can use it "
            "(set [gateway] api_keys, or listen on 127.0.0.1)",
            section.listen,
        )


def make_client(config: GatewayConfig) -> httpx.AsyncClient:
    """The HTTP client of the fleet API calls (requests are proxied by ``Proxy``'s own pools)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(CALL_TIMEOUT, connect=config.gateway.connect_timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,
    )


async def run_gateway(
    config: GatewayConfig,
    models: ModelsFile,
    *,
    shutdown: trio.Event,
    models_path: str | None = None,
    task_status: trio.TaskStatus[GatewayHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``shutdown`` is set and in-flight requests drain.

    Reports a :class:`GatewayHandle` (bound API and metrics URLs, the fleet
    state) once both servers listen.

    Raises:
      ConfigError: the API keys file cannot be read.
      OSError: a listen address cannot be bound.
    """
    section = config.gateway
    async with make_client(config) as client:
        gateway = Gateway.build(config, models, client)
        gateway.models_path = models_path
        app = create_app(gateway)
        async with trio.open_nursery() as background:
            await background.start(gateway.router.loader.run)
            await background.start(gateway.router.preloader.run)
            await background.start(gateway.proxy.watch_fleet)
            background.start_soon(gateway.proxy.stop_after, shutdown, section.grace_period)
            # Metrics stay up while the API drains: its shutdown 503s can be scraped.
            api_stopped = trio.Event()
            async with trio.open_nursery() as servers:
                api_url = await servers.start(
                    partial(
                        serve,
                        app,
                        section.listen,
                        default_port=DEFAULT_PORT,
                        shutdown_trigger=shutdown.wait,
                        # The proxy cuts what runs past grace_period (stop_after):
                        # the server waits a moment more for those answers to end.
                        grace_period=section.grace_period + STOP_MARGIN,
                        stopped=api_stopped,
                    )
                )
                metrics_url = await servers.start(
                    partial(
                        serve,
                        _metrics_app(gateway.metrics),
                        section.metrics_listen,
                        default_port=DEFAULT_METRICS_PORT,
                        shutdown_trigger=api_stopped.wait,
                        grace_period=1.0,
                        name="metrics_listen",
                    )
                )
                # Polls start once both ports listen: a [[neurons]] entry
                # pointed at one of them by mistake then gets its answer (a
                # 404 naming the path), not a refused connection.
                for neuron in gateway.state.neurons.values():
                    background.start_soon(
                        partial(
                            poll_neuron,
                            gateway.api,
                            gateway.state,
                            neuron,
                            section,
                            gateway.metrics,
                        )
                    )
                log_start(gateway, api_url, metrics_url)
                task_status.started(GatewayHandle(api_url, metrics_url, gateway.state, gateway))
            # Both servers have drained: stop polling and any load under way.
            background.cancel_scope.cancel()
        gateway.proxy.close()


__all__ = ["UNKNOWN", "Gateway", "GatewayHandle", "create_app", "run_gateway"]
