"""The gateway: its HTTP API, and ``run_gateway`` that owns every task.

``run_gateway`` opens one nursery holding the API server, the metrics
server, one poller per neuron, and the model loads the router starts; it
reports a :class:`GatewayHandle` once both servers are bound and returns
after ``shutdown`` is set and in-flight requests have drained.

Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``
(proxied as they are), ``/v1/messages`` and ``/v1/messages/count_tokens``
(Anthropic, translated), ``/v1/models``, ``/health``. Errors come in the
caller's dialect: Anthropic's envelope under ``/v1/messages``, OpenAI's
everywhere else.
"""

from __future__ import annotations

import hmac
import json
import logging
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cortex.config import GatewayConfig, ModelsFile, NeuronEndpoint, read_api_keys
from cortex.errors import (
    ConfigError,
    CortexError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unauthorized,
    UpstreamError,
    error_for_status,
)
from cortex.fleet import make_converter
from cortex.gateway.fleetview import fleet_view, location_status
from cortex.gateway.metrics import UNKNOWN, GatewayMetrics
from cortex.gateway.passthrough import OPENAI_ENDPOINTS, Passthrough, hand_over, new_request_id
from cortex.gateway.poller import poll_neuron
from cortex.gateway.proxy import CLIENT_CLOSED, Exchange, Proxy, abandoned_status
from cortex.gateway.reload import reload_catalogue
from cortex.gateway.router import Router
from cortex.gateway.state import LOADED, LOADING, FleetState, feasible
from cortex.gateway.upstream import NeuronAPI
from cortex.serve import bound_url, is_loopback, serve
from cortex.wire import anthropic, jsonbody, openai, sse, translate
from cortex.wire.envelope import ANTHROPIC, OPENAI, error_parts, id_headers

log = logging.getLogger(__name__)

DEFAULT_PORT = 31313
DEFAULT_METRICS_PORT = 31314
DEFAULT_NEURON = NeuronEndpoint(name="local", endpoint="http://127.0.0.1:13131")

#: Seconds a stream waits past its first byte for the prompt's token count.
COUNT_GRACE = 1.0
#: Seconds a small neuron call (health, models, tokenize) may take.
CALL_TIMEOUT = 10.0

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@attrs.frozen
class GatewayHandle:
    """What ``run_gateway`` reports once it is serving."""

    api_url: str
    metrics_url: str
    state: FleetState


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

    # -- request helpers ----------------------------------------------------------

    async def ready(self) -> None:
        """Wait (briefly) for the first poll of every neuron after start."""
        with trio.move_on_after(CALL_TIMEOUT + self.config.gateway.connect_timeout):
            await self.state.wait_polled()

    def authenticate(self) -> None:
        """``check_key`` on the current Quart request."""
        self.check_key(request.headers.get("x-api-key"), request.headers.get("authorization"))

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

    def authenticated(self) -> bool:
        """Whether the current Quart request may see what keys guard (no keys set: yes)."""
        try:
            self.authenticate()
        except Unauthorized:
            return False
        return True

    async def read_json(self) -> dict[str, Any]:
        """The request body as a JSON object."""
        return (await self.read_body())[0]

    async def read_body(self) -> tuple[dict[str, Any], bytes]:
        """The request body as a JSON object, and as it came.

        Raises:
          PayloadTooLarge: over ``max_body_bytes``.
          InvalidRequest: not JSON, or not an object.
        """
        limit = self.config.gateway.max_body_bytes
        try:
            data = await request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        return self.parse_json(data), data

    @staticmethod
    def parse_json(data: bytes) -> dict[str, Any]:
        """``data`` as a JSON object.

        Raises:
          InvalidRequest: not JSON, nested too deeply, or not an object.
        """
        return jsonbody.loads_object(data)

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

    def count_error(self, ex: Exchange, status: int) -> None:
        """Metrics for a request that ended before reaching a neuron."""
        self.proxy.finish(ex, status=status)


#: The reply-limit fields of the endpoints whose absent limit means "the
#: whole context" (completions' absent max_tokens means 16, as OpenAI's).
MAX_TOKENS_KEYS = {
    "chat/completions": ("max_tokens", "max_completion_tokens"),
    "responses": ("max_output_tokens",),
}


def _request_id() -> str:
    return request.headers.get("x-request-id") or new_request_id()


def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(exc: CortexError, *, anthropic_dialect: bool, request_id: str) -> Response:
    """``exc`` in the caller's dialect, with Retry-After where it applies."""
    status, body, headers = error_parts(
        exc, dialect=ANTHROPIC if anthropic_dialect else OPENAI, request_id=request_id
    )
    response = Response(body, status=status, content_type="application/json")
    for name, value in headers:
        response.headers[name] = value
    return response


def _id_headers(response: Response, request_id: str, anthropic_dialect: bool) -> None:
    for name, value in id_headers(request_id, ANTHROPIC if anthropic_dialect else OPENAI):
        response.headers[name] = value


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


def _stream_response(body: Any, content_type: str, request_id: str, anth: bool) -> Response:
    response = Response(body, status=200, content_type=content_type)
    response.headers.update(SSE_HEADERS)
    _id_headers(response, request_id, anth)
    # Quart's RESPONSE_TIMEOUT (60 s) would cut long generations.
    response.timeout = None
    return response


def create_app(gateway: Gateway) -> Passthrough:
    """The gateway's ASGI app (hypercorn on trio serves it).

    The OpenAI passthrough POSTs are answered by :class:`Passthrough`, the
    hot path, without Quart; every other request goes to the Quart app.
    """
    return Passthrough(gateway, _quart_app(gateway))


def _quart_app(gateway: Gateway) -> QuartTrio:
    app = QuartTrio("cortex.gateway")
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.gateway.max_body_bytes
    state, router, proxy = gateway.state, gateway.router, gateway.proxy

    @app.before_request
    async def read_whole_body() -> None:
        await drain_body()

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        error = error_for_status(status, exc.description or exc.name)
        return error_response(
            error, anthropic_dialect=_is_anthropic(request.path), request_id=_request_id()
        )

    # -- OpenAI: proxied as sent ----------------------------------------------------

    async def served_by_passthrough() -> Response:
        """Never runs: ``Passthrough`` answers these POSTs before Quart.

        The rules are registered so that Quart answers the other methods on
        these paths (405, OPTIONS) as it does everywhere else.
        """
        raise RuntimeError(f"{request.path} is served by Passthrough, not Quart")

    for path in OPENAI_ENDPOINTS:
        app.add_url_rule(path, path, served_by_passthrough, methods=["POST"])

    # -- Anthropic: translated --------------------------------------------------------

    @app.post("/v1/messages")
    async def messages() -> Response:
        ex = Exchange(endpoint="messages", request_id=_request_id(), started=trio.current_time())
        input_tokens = 0
        try:
            gateway.authenticate()
            req = anthropic.parse_messages_request(await gateway.read_json())
            await gateway.ready()
            ex.model = router.resolve(req.model)
            ex.stream = req.stream
            chat = translate.anthropic_to_openai(req, model=ex.model)
            gateway.apply_defaults(ex.model, chat, "chat/completions")
            content = json.dumps(chat).encode()
            if not ex.stream:
                await proxy.dispatch(ex, "/v1/chat/completions", content)
            else:

                async def count() -> None:
                    nonlocal input_tokens
                    input_tokens = await count_input(ex.model, chat, ex.request_id)

                # message_start carries the prompt's size: count it while
                # the neuron processes the prompt, waiting briefly past the
                # first byte for the count rather than delaying the stream.
                failure: CortexError | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(count)
                    try:
                        await proxy.dispatch(ex, "/v1/chat/completions", content)
                    except CortexError as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                    else:
                        nursery.cancel_scope.deadline = trio.current_time() + COUNT_GRACE
                if failure is not None:
                    raise failure
        except CortexError as exc:
            gateway.count_error(ex, anthropic.status_for(exc))
            return error_response(exc, anthropic_dialect=True, request_id=ex.request_id)
        except BaseException as exc:
            gateway.count_error(ex, abandoned_status(exc))
            raise
        assert ex.response is not None and ex.model is not None
        if ex.stream:
            # Quart sends the stream after this returns: should it never
            # start, the relay's finally does not run and Passthrough
            # finishes the exchange instead.
            hand_over(request.scope, ex)
            body = relay_anthropic(ex, ex.model, input_tokens)
            return _stream_response(body, "text/event-stream", ex.request_id, True)
        ex.response.close()
        try:
            answer = translate.openai_to_anthropic(json.loads(ex.first), model=ex.model)
            proxy.finish(ex, status=200, usage=answer["usage"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            proxy.finish(ex, status=502)
            error = UpstreamError(f"neuron answered with a malformed completion: {exc}")
            return error_response(error, anthropic_dialect=True, request_id=ex.request_id)
        finally:
            # Whatever else goes wrong, the route is released (a no-op once finished).
            proxy.finish(ex, status=500)
        response = _json(answer)
        _id_headers(response, ex.request_id, True)
        return response

    async def count_input(model_id: str, chat: dict[str, Any], request_id: str) -> int:
        """The prompt's tokens by the neuron's tokenizer; 0 when it cannot say.

        Asked of a neuron that has the model loaded (during a cold load,
        once it is), without ``router.acquire``: that would take a request
        slot from the very generation this counts for.
        """
        body = {"model": model_id, "messages": chat["messages"]}
        if chat.get("tools"):
            body["tools"] = chat["tools"]
        try:
            with trio.fail_after(gateway.config.gateway.load_timeout):
                while True:
                    loaded = [n for n in state.routable() if n.status_of(model_id) == LOADED]
                    if loaded:
                        break
                    await state.wait_changed()
            return await gateway.api.tokenize(loaded[0], body, request_id)
        except (CortexError, trio.TooSlowError) as exc:
            log.debug("request %s: no input token count: %s", request_id, exc)
            return 0

    async def relay_anthropic(ex: Exchange, model: str, input_tokens: int) -> Any:
        """The neuron's chat stream as Anthropic events."""
        stream = translate.AnthropicStream(
            message_id=anthropic.new_message_id(), model=model, input_tokens=input_tokens
        )
        decoder = sse.SSEDecoder()
        usage: dict[str, Any] | None = None

        def feed(chunk: bytes) -> tuple[list[tuple[str, dict[str, Any]]], int | None]:
            """Events for ``chunk``, and the status if the stream failed in it."""
            nonlocal usage
            events: list[tuple[str, dict[str, Any]]] = []
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    continue
                try:
                    data = json.loads(event.data)
                except ValueError:
                    return events + stream.error("neuron sent a malformed chunk", status=502), 502
                if not isinstance(data, dict):
                    continue
                if data.get("usage"):
                    usage = data["usage"]
                events += stream.feed(data)
                if "error" in data:  # the neuron's own mid-stream error
                    return events, 500
            return events, None

        def encode(events: list[tuple[str, dict[str, Any]]]) -> bytes:
            return b"".join(sse.encode(payload, event=name) for name, payload in events)

        status = CLIENT_CLOSED
        try:
            yield encode(stream.start())
            chunk: bytes | None = ex.first
            while chunk is not None:
                events, failed = feed(chunk)
                if events:
                    yield encode(events)
                if failed is not None:
                    status = failed
                    break
                try:
                    chunk = await proxy.next_chunk(ex)
                except CortexError as exc:
                    log.warning("request %s: %s", ex.request_id, exc.message)
                    status = anthropic.status_for(exc)
                    yield encode(stream.error(exc.message, status=status))
                    break
            else:
                # No finish_reason: the neuron's stream was cut short, and
                # finish() ends it with an error event.
                status = 200 if stream.complete else 502
                if not stream.complete:
                    log.warning("request %s: the neuron's stream ended early", ex.request_id)
                yield encode(stream.finish())
        finally:
            proxy.finish(ex, status=status, usage=usage)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> Response:
        request_id = _request_id()
        try:
            gateway.authenticate()
            req = anthropic.parse_count_tokens_request(await gateway.read_json())
            await gateway.ready()
            model_id = router.resolve(req.model)
            chat = translate.anthropic_to_openai(req, model=model_id)
            # The tokenizer lives with the model: this routes (and cold
            # loads when needed) exactly like a generation would.
            neuron = await router.acquire(model_id, exclude=set())
            try:
                count = await gateway.api.tokenize(neuron, chat, request_id)
            finally:
                router.release(neuron, model_id)
        except CortexError as exc:
            return error_response(exc, anthropic_dialect=True, request_id=request_id)
        response = _json(anthropic.count_tokens_response(count))
        _id_headers(response, request_id, True)
        return response

    # -- the catalogue and health ---------------------------------------------------

    @app.get("/v1/models")
    async def list_models() -> Response:
        try:
            gateway.authenticate()
        except CortexError as exc:
            return error_response(exc, anthropic_dialect=False, request_id=_request_id())
        await gateway.ready()
        return _json(openai.model_list(model_entries(gateway)))

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        try:
            gateway.authenticate()
            for entry in model_entries(gateway):
                if entry["id"] == model_id:
                    return _json(entry)
            raise _not_found(model_id)
        except CortexError as exc:
            return error_response(exc, anthropic_dialect=False, request_id=_request_id())

    @app.post("/admin/reload")
    async def admin_reload() -> Response:
        try:
            # Admin routes exist only behind keys: an open gateway has no admin.
            if not gateway.api_keys:
                raise PermissionDenied("POST /admin/reload needs [gateway] api_keys to be set")
            gateway.authenticate()
            if gateway.models_path is None:
                raise InvalidRequest("the gateway was started without --models: nothing to reload")
            try:
                catalogue = await reload_catalogue(state, gateway.models_path)
            except ConfigError as exc:
                raise InvalidRequest(f"kept the old catalogue: {exc.message}") from None
        except CortexError as exc:
            return error_response(exc, anthropic_dialect=False, request_id=_request_id())
        return _json(
            {
                "status": "reloaded",
                "models": len(catalogue.models),
                "aliases": len(catalogue.aliases),
            }
        )

    @app.get("/fleet")
    async def fleet() -> Response:
        try:
            gateway.authenticate()
        except CortexError as exc:
            return error_response(exc, anthropic_dialect=False, request_id=_request_id())
        await gateway.ready()
        return _json(fleet_view(state))

    @app.get("/health")
    async def health() -> Response:
        """Up or down for anyone; endpoints, errors and models behind the API keys.

        Health checkers need no key, but endpoints and transport errors
        name internal addresses.
        """
        up = sum(1 for n in state.neurons.values() if n.up)
        status = "ok" if up == len(state.neurons) else "degraded" if up else "down"
        if not gateway.authenticated():
            brief = [{"name": n.name, "up": n.up} for n in state.neurons.values()]
            return _json({"status": status, "neurons": brief})
        neurons = [
            {
                "name": n.name,
                "endpoint": n.endpoint,
                "up": n.up,
                "suspect": n.suspect,
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
            ids += [m for m in neuron.models if m not in ids]

    def describe(model_id: str) -> dict[str, Any]:
        locations = []
        created = int(state.started_at)
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
        entry = state.catalogue.models.get(model_id)
        feasible_on = (
            [n.name for n in state.neurons.values() if feasible(entry, n)] if entry else []
        )
        statuses = {loc["status"] for loc in locations}
        status = next(
            (s for s in (LOADED, LOADING, "failed") if s in statuses),
            "available" if feasible_on else "unavailable",
        )
        return {
            "created": created,
            "loaded": status == LOADED,
            "status": status,
            "locations": locations,
            "feasible_on": feasible_on,
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
    """prometheus-client's ASGI app, plus the lifespan protocol hypercorn speaks."""
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
            await inner(scope, receive, send)

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
            gateway.router.nursery = background
            for neuron in gateway.state.neurons.values():
                background.start_soon(
                    partial(
                        poll_neuron, gateway.api, gateway.state, neuron, section, gateway.metrics
                    )
                )
            async with trio.open_nursery() as servers:
                api_url = await servers.start(
                    partial(
                        serve,
                        app,
                        section.listen,
                        default_port=DEFAULT_PORT,
                        shutdown_trigger=shutdown.wait,
                        grace_period=section.grace_period,
                    )
                )
                metrics_url = await servers.start(
                    partial(
                        serve,
                        _metrics_app(gateway.metrics),
                        section.metrics_listen,
                        default_port=DEFAULT_METRICS_PORT,
                        shutdown_trigger=shutdown.wait,
                        grace_period=1.0,
                    )
                )
                log_start(gateway, api_url, metrics_url)
                task_status.started(GatewayHandle(api_url, metrics_url, gateway.state))
            # Both servers have drained: stop polling and any load under way.
            background.cancel_scope.cancel()
        gateway.proxy.close()


__all__ = ["UNKNOWN", "Gateway", "GatewayHandle", "create_app", "run_gateway"]
