"""The neuron's HTTP app and its main task.

``run_neuron`` owns one nursery: the API server, the device sampler, the
activation (pre-load) task, model loads and one generation worker per
loaded model. ``create_app`` builds the quart-trio app from a ``Neuron``;
nothing here exists at import time.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import attrs
import cattrs
import pluggy
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from cortex import toolcalls
from cortex.config import NeuronConfig
from cortex.errors import (
    CortexError,
    GenerationFailed,
    InvalidRequest,
    Unauthorized,
    Unavailable,
    log_summary,
)
from cortex.fleet import DeviceSample, Discovery, Health, MemoryBudget, make_converter
from cortex.harness import harness_infos, plugin_manager
from cortex.neuron import discovery
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.models import LoadRequest, ModelManager, ModelSlot
from cortex.neuron.session import (
    Generation,
    Sessions,
    outcome,
    render,
    tokenize_prompt,
    tokenize_text,
    tool_finish,
    usage_of,
)
from cortex.neuron.workers import Delta, Done, Failed
from cortex.serve import serve
from cortex.wire import envelope, jsonbody, openai, responses, sse
from cortex.wire.openai_stream import ChatStream, CompletionStream, Frame
from cortex.wire.responses import ResponsesStream

log = logging.getLogger(__name__)

DEFAULT_PORT = 13131
#: Routes that stay open when a token is set and ``open_health`` is on.
HEALTH_ROUTES = frozenset({"/health", "/metrics"})


@attrs.define(eq=False)
class Neuron:
    """The state one neuron serves from."""

    config: NeuronConfig
    pm: pluggy.PluginManager
    nvml: discovery.Nvml
    manager: ModelManager
    discovery: Discovery
    started: float = attrs.field(factory=time.monotonic)
    samples: list[DeviceSample] = attrs.field(factory=list)
    metrics: NeuronMetrics = attrs.field(init=False)
    #: Shutting down: requests already taken run on, new work is refused
    #: (``Draining``) and /health says so, so that gateways send it elsewhere.
    draining: bool = False

    def __attrs_post_init__(self) -> None:
        self.metrics = NeuronMetrics(self.manager.statuses, lambda: self.samples)
        self.manager.on_loaded.append(
            lambda slot, seconds: self.metrics.load_seconds.labels(slot.id).observe(seconds)
        )
        self.manager.on_job_finished.append(self.metrics.job_finished)

    def health(self) -> Health:
        statuses = self.manager.statuses()
        return Health(
            uptime_secs=round(time.monotonic() - self.started, 3),
            devices=self.samples,
            memory=MemoryBudget(
                total_mb=self.manager.memory_budget_mb, used_mb=self.manager.memory_used_mb()
            ),
            activation=self.manager.activation(),
            queue_depth=sum(s.queued for s in statuses),
            in_flight=sum(s.in_flight for s in statuses),
            draining=self.draining,
        )

    async def sample_devices(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep ``samples`` fresh for /health and /metrics (not sampled per request)."""
        await self._sample()
        task_status.started()
        if not self.nvml.available:
            return
        while True:
            await trio.sleep(self.config.neuron.sample_interval)
            await self._sample()

    async def _sample(self) -> None:
        try:
            self.samples = await trio.to_thread.run_sync(self.nvml.sample)
        except Exception as exc:  # a flaky driver must not take the neuron down
            log.warning("device sample failed: %s", exc)


#: What a draining neuron still takes: it finishes what it has, nothing new.
DRAINING_ALLOWED = frozenset({"/models/unload", "/tokenize"})
#: Seconds the server gives the connections left once the drain has ended,
#: idle or not: answers being written, refusals of the last instant.
DRAIN_TAIL = 1.0


@attrs.define(eq=False)
class Draining:
    """The ASGI app wrapped to count what a draining neuron waits for.

    Every POST counts (generations, loads) until its last byte is sent: a
    streamed answer outlives its view. GETs (the gateway's polls, metrics)
    never do: they are answered through the drain, which is how gateways
    see the neuron drain before it stops listening.
    """

    app: Any
    #: POST requests being answered.
    running: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.running += 1
        answered = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not answered:
                # The client left before the answer began (the view was
                # cancelled): the request's log line would never come.
                headers = dict(scope.get("headers") or ())
                log.info(
                    "%s %s 499 request_id=%s (the client left before the answer)",
                    scope["method"],
                    scope["path"],
                    headers.get(b"x-request-id", b"-").decode("latin-1"),
                )
            self.running -= 1
            if not self.running:
                self._idle.set()
                self._idle = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no POST is being answered."""
        while self.running:
            await self._idle.wait()


@attrs.frozen
class NeuronHandle:
    url: str
    neuron: Neuron


def default_memory_budget_mb() -> int:
    return discovery.ram_total_mb() * 9 // 10


async def run_neuron(
    config: NeuronConfig,
    *,
    shutdown: trio.Event,
    plugins: Iterable[object] = (),
    task_status: trio.TaskStatus[NeuronHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a neuron until ``shutdown`` is set; then drain, unload and return.

    Args:
      plugins: engine plugin objects to register besides the entry points.
    """
    section = config.neuron
    # Placements name NVML indices; make CUDA number devices the same way
    # (by PCI bus) before any engine initialises CUDA.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    pm = plugin_manager(blocked=section.blocked_harnesses, plugins=plugins)
    nvml = discovery.Nvml()
    await trio.to_thread.run_sync(nvml.start)
    try:
        found = await trio.to_thread.run_sync(discovery.discover, nvml, harness_infos(pm))
        async with trio.open_nursery() as nursery:
            manager = ModelManager(
                pm,
                nursery,
                model_dirs=section.model_dirs,
                memory_budget_mb=section.memory_budget_mb or default_memory_budget_mb(),
                n_ctx_max=section.n_ctx_max,
                queue_limit=section.queue_limit,
                device_free_mb=lambda: {s.index: s.vram_free_mb for s in neuron.samples},
            )
            neuron = Neuron(config=config, pm=pm, nvml=nvml, manager=manager, discovery=found)
            await nursery.start(neuron.sample_devices)
            activation = trio.CancelScope()

            async def activate() -> None:
                with activation:
                    await manager.activate([LoadRequest.from_config(m) for m in config.models])

            nursery.start_soon(activate)
            app = Draining(create_app(neuron))

            async def drain() -> None:
                # Still listening while it drains: polls see ``draining`` (a
                # neuron that refused connections would only read as down),
                # a request that raced them gets a 503 and goes elsewhere.
                await shutdown.wait()
                neuron.draining = True
                # Stop activating, or it would load models behind unload_all.
                activation.cancel()
                log.info(
                    "draining: %d request(s) running, up to %g s", app.running, section.grace_period
                )
                with trio.move_on_after(section.grace_period):
                    await app.wait_idle()

            async with trio.open_nursery() as server:
                url = await server.start(
                    partial(
                        serve,
                        app,
                        section.listen,
                        default_port=DEFAULT_PORT,
                        shutdown_trigger=drain,
                        # The grace period was the drain's; what runs on is cut.
                        grace_period=min(DRAIN_TAIL, section.grace_period),
                    )
                )
                task_status.started(NeuronHandle(url=url, neuron=neuron))
            # The server has drained: nothing can reach the models any more.
            activation.cancel()
            # Shielded from the caller's cancellation, bounded by its own deadline.
            with trio.CancelScope(shield=True) as unloading:
                unloading.deadline = trio.current_time() + section.grace_period
                await manager.unload_all()
            nursery.cancel_scope.cancel()
    finally:
        nvml.stop()


# -- the app --------------------------------------------------------------------------


def create_app(neuron: Neuron) -> QuartTrio:
    app = QuartTrio("cortex.neuron")
    app.config["MAX_CONTENT_LENGTH"] = neuron.config.neuron.max_body_bytes
    api = NeuronApi(neuron)
    app.before_request(take_request_id)
    app.before_request(read_whole_body)
    app.before_request(api.authenticate)
    app.before_request(api.refuse_new_work_when_draining)
    app.after_request(add_request_id)
    app.register_error_handler(CortexError, cortex_error)
    app.register_error_handler(HTTPException, http_error)
    for method, rule, view in api.routes():
        app.add_url_rule(rule, view_func=view, methods=[method])
    return app


async def take_request_id() -> None:
    # First: an answer refused before the rest (a 413) carries one too.
    # The gateway passes its request id on; a direct client may not send one.
    g.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex


async def read_whole_body() -> None:
    # Before authenticating: a 401 sent with the body unread leaves the
    # keep-alive connection's next request hanging now and then
    # (quart-trio under hypercorn). Bounded by MAX_CONTENT_LENGTH.
    await request.get_data()


async def add_request_id(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers["x-request-id"] = request_id
    if request.path.startswith("/v1/") or request.method == "POST":
        error = g.get("error")
        log.info(
            "%s %s %d request_id=%s%s",
            request.method,
            request.path,
            response.status_code,
            request_id,
            "" if error is None else f" error={log_summary(error)}",
        )
    return response


async def cortex_error(exc: CortexError) -> Response:
    return error_response(exc)


async def http_error(exc: HTTPException) -> Response:
    return error_response(envelope.framework_error(exc, request.method, request.path))


async def read_json() -> Any:
    content = jsonbody.decode(
        await request.get_data(cache=False),
        request.headers.get("content-encoding"),
        limit=current_app.config["MAX_CONTENT_LENGTH"],
    )
    return jsonbody.loads(content)


View = Callable[..., Awaitable[Any]]


@attrs.define(eq=False)
class NeuronApi:
    """The neuron's routes: the fleet API the gateway calls, and inference."""

    neuron: Neuron
    converter: cattrs.Converter = attrs.field(factory=make_converter)
    sessions: Sessions = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.sessions = Sessions(
            manager=self.neuron.manager,
            metrics=self.neuron.metrics,
            default_max_tokens=self.neuron.config.neuron.default_max_tokens,
        )

    def routes(self) -> list[tuple[str, str, View]]:
        return [
            # The fleet API: what the gateway calls.
            ("GET", "/discovery", self.get_discovery),
            ("GET", "/health", self.get_health),
            ("GET", "/models", self.list_models),
            ("POST", "/models/load", self.load_model),
            ("POST", "/models/unload", self.unload_model),
            ("GET", "/models/<path:model_id>/endpoint", self.model_endpoint),
            ("POST", "/tokenize", self.tokenize),
            ("GET", "/metrics", self.metrics),
            # Inference: the OpenAI dialects.
            ("GET", "/v1/models", self.v1_models),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/responses", self.create_response),
        ]

    async def authenticate(self) -> None:
        section = self.neuron.config.neuron
        if section.token is None:
            return
        if section.open_health and request.path in HEALTH_ROUTES:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {section.token}".encode()):
            raise Unauthorized("missing or wrong neuron token (Authorization: Bearer ...)")

    async def refuse_new_work_when_draining(self) -> None:
        if (
            self.neuron.draining
            and request.method == "POST"
            and request.path not in DRAINING_ALLOWED
        ):
            # 503: a gateway tries the next route; Retry-After for a direct client.
            raise Unavailable(
                "this neuron is shutting down: it finishes what it has and takes no new work"
            )

    # -- the fleet API --

    async def get_discovery(self) -> Any:
        return self.converter.unstructure(self.neuron.discovery)

    async def get_health(self) -> Any:
        return self.converter.unstructure(self.neuron.health())

    async def list_models(self) -> Any:
        return self.converter.unstructure(self.neuron.manager.statuses())

    async def load_model(self) -> Any:
        load = LoadRequest.from_json(await read_json())
        slot = await self.neuron.manager.load(load)
        return {"status": "loaded", "model": self.converter.unstructure(slot.status_view())}

    async def unload_model(self) -> Any:
        body = await read_json()
        model_id = body.get("model_id") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("model_id must be a non-empty string", param="model_id")
        cancel = body.get("cancel", False)
        if not isinstance(cancel, bool):
            raise InvalidRequest("cancel must be a boolean", param="cancel")
        cancelled = await self.neuron.manager.unload(model_id, cancel=cancel)
        return {"status": "unloaded", "model_id": model_id, "cancelled": cancelled}

    async def model_endpoint(self, model_id: str) -> Any:
        self.neuron.manager.serving(model_id)
        return {"url": request.host_url.rstrip("/") + "/v1"}

    async def tokenize(self) -> Any:
        body = await read_json()
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise InvalidRequest("model must be a string", param="model")
        with self.neuron.manager.using(body["model"]) as slot:
            return await count_tokens(slot, body)

    async def metrics(self) -> Response:
        registry = self.neuron.metrics.registry
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    # -- inference --

    async def v1_models(self) -> Any:
        return openai.model_list(
            [
                openai.model_entry(
                    s.id, created=int(s.loaded_at or 0), owned_by="cortex", status=s.status
                )
                for s in self.neuron.manager.statuses()
                if s.status == "loaded"
            ]
        )

    async def chat_completions(self) -> Any:
        arrived = time.perf_counter()
        chat = openai.parse_chat_request(await read_json())
        generation = await self.sessions.start_chat(
            chat, max_tokens=chat.max_tokens, stops=chat.stop, endpoint="chat", arrived=arrived
        )
        ids = dict(id=openai.new_id("chatcmpl"), created=openai.now(), model=chat.model)
        if not chat.stream:
            return await chat_answer(generation, ids)
        job = generation.job  # admitted: its prompt is seated
        prompt = (
            openai.Usage(job.prompt_tokens, 0, job.cached_tokens) if job.prompt_tokens else None
        )
        builder = ChatStream(**ids, include_usage=chat.include_usage, prompt=prompt)
        return event_stream(chat_events(generation, builder))

    async def completions(self) -> Any:
        arrived = time.perf_counter()
        req = openai.parse_completion_request(await read_json())
        with self.neuron.manager.using(req.model) as slot:
            prompts = [
                await tokenize_text(slot, p) if isinstance(p, str) else list(p) for p in req.prompts
            ]
        sampling = req.sampling.apply({})

        async def run(tokens: list[int]) -> Generation:
            return await self.sessions.submit(
                slot,
                prompt_tokens=tokens,
                max_tokens=req.max_tokens,
                sampling=sampling,
                stops=req.stop,
                template_stops=(),
                endpoint="completions",
                arrived=arrived,
            )

        ids = dict(id=openai.new_id("cmpl"), created=openai.now(), model=req.model)
        if not req.stream:
            return await completion_answer(prompts, run, ids)
        first = await run(prompts[0])
        builder = CompletionStream(**ids, include_usage=req.include_usage)
        return event_stream(completion_events(first, prompts[1:], run, builder))

    async def create_response(self) -> Any:
        arrived = time.perf_counter()
        req = responses.parse_responses_request(await read_json())
        generation = await self.sessions.start_chat(
            req, max_tokens=req.max_output_tokens, stops=(), endpoint="responses", arrived=arrived
        )
        response_id, created_at = responses.new_response_id(), openai.now()
        if not req.stream:
            return await response_answer(generation, response_id, created_at, req)
        builder = ResponsesStream(
            id=response_id,
            created_at=created_at,
            model=req.model,
            echo=req.echo,
            max_tool_calls=req.max_tool_calls,
            namespaced=req.namespaced,
        )
        return event_stream(response_events(generation, builder))


async def count_tokens(slot: ModelSlot, body: dict[str, Any]) -> dict[str, Any]:
    model = slot.model
    assert model is not None
    if "messages" in body:
        chat = openai.parse_chat_request(
            {
                "model": body["model"],
                "messages": body["messages"],
                "tools": body.get("tools"),
                "continue_final_message": body.get("continue_final_message"),
            }
        )
        prompt = await render(
            slot, chat.messages, chat.tools, continue_final=chat.continue_final_message
        )
        return {"count": len(await tokenize_prompt(slot, prompt))}
    text = body.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("give text (a string) or messages", param="text")
    tokens = await trio.to_thread.run_sync(partial(model.tokenize, text, add_bos=False))
    return {"count": len(tokens), "tokens": tokens}


# -- answers: whole, and as event streams ----------------------------------------------


async def chat_answer(generation: Generation, ids: dict[str, Any]) -> dict[str, Any]:
    text, done = await generation.finish()
    content: str | None = text
    calls: list[toolcalls.ToolCall] = []
    if generation.plan.family is not None:
        text, calls = toolcalls.parse_tool_calls(text, generation.plan.family)
        content = text or (None if calls else "")
    finish_reason, stop_sequence = tool_finish(done, calls)
    return openai.chat_completion(
        **ids,
        content=content,
        tool_calls=[call.to_openai() for call in calls],
        finish_reason=finish_reason,
        usage=usage_of(done),
        stop_sequence=stop_sequence,
    )


async def chat_events(generation: Generation, builder: ChatStream) -> AsyncIterator[bytes]:
    """A chat answer as chunks; with tools, its text is read for tool calls."""
    parser = generation.parser()
    async for event in generation.events():
        if isinstance(event, Failed):
            frames = builder.fail(event.message)
        elif parser is None:
            frames = builder.text(event.text) if isinstance(event, Delta) else []
        else:
            pieces = parser.feed(event.text) if isinstance(event, Delta) else parser.flush()
            frames = chat_pieces(builder, pieces)
        if isinstance(event, Done):
            reason, stop_sequence = tool_finish(event, [] if parser is None else parser.calls)
            frames += builder.finish(
                finish_reason=reason, stop_sequence=stop_sequence, usage=usage_of(event)
            )
        for name, payload in frames:
            yield sse.encode(payload, event=name)


def chat_pieces(builder: ChatStream, pieces: list[toolcalls.Piece]) -> list[Frame]:
    frames = []
    for piece in pieces:
        if isinstance(piece, str):
            frames += builder.text(piece)
        else:
            frames += builder.tool_call(piece.to_openai())
    return frames


async def completion_answer(
    prompts: list[list[int]],
    run: Callable[[list[int]], Awaitable[Generation]],
    ids: dict[str, Any],
) -> dict[str, Any]:
    """Each prompt's choice, generated one after the other."""
    results = [await (await run(tokens)).finish() for tokens in prompts]
    body = openai.text_completion(
        **ids,
        choices=[(text, done.finish_reason) for text, done in results],
        usage=openai.Usage(
            prompt_tokens=sum(done.prompt_tokens for _, done in results),
            completion_tokens=sum(done.completion_tokens for _, done in results),
            cached_tokens=sum(done.cached_tokens for _, done in results),
        ),
    )
    for choice, (_, done) in zip(body["choices"], results, strict=True):
        if done.stop_sequence is not None:
            choice["stop_sequence"] = done.stop_sequence
    return body


async def completion_events(
    first: Generation,
    rest: list[list[int]],
    run: Callable[[list[int]], Awaitable[Generation]],
    builder: CompletionStream,
) -> AsyncIterator[bytes]:
    """Each prompt's choice in turn; the later prompts queue as the earlier end."""
    for index in range(len(rest) + 1):
        try:
            generation = first if index == 0 else await run(rest[index - 1])
        except CortexError as exc:  # unloaded, or the queue filled meanwhile
            yield sse.encode(openai.error_body(exc))
            return
        async for event in generation.events():
            if isinstance(event, Delta):
                frames = builder.text(index, event.text)
            elif isinstance(event, Done):
                frames = builder.finish_choice(
                    index,
                    finish_reason=event.finish_reason,
                    stop_sequence=event.stop_sequence,
                    usage=usage_of(event),
                )
            else:
                yield sse.encode(openai.error_body(GenerationFailed(event.message)))
                return
            for name, payload in frames:
                yield sse.encode(payload, event=name)
    for name, payload in builder.finish():
        yield sse.encode(payload, event=name)


async def response_answer(
    generation: Generation, response_id: str, created_at: int, req: responses.ResponsesRequest
) -> dict[str, Any]:
    text, done = await generation.finish()
    calls: list[toolcalls.ToolCall] = []
    if generation.plan.family is not None:
        text, calls = toolcalls.parse_tool_calls(text, generation.plan.family)
        calls = calls[: req.max_tool_calls]
    status, reason = outcome(done)
    return responses.response_object(
        id=response_id,
        created_at=created_at,
        model=req.model,
        echo=req.echo,
        text=text,
        status=status,
        usage=usage_of(done),
        incomplete_reason=reason,
        message_id=responses.new_message_id(),
        function_calls=[
            responses.function_call_item(
                id=responses.new_function_call_id(),
                call_id=call.id,
                name=name,
                arguments=call.arguments,
                status=status,
                namespace=namespace,
            )
            for call in calls
            for name, namespace in [req.called(call.name)]
        ],
    )


async def response_events(generation: Generation, builder: ResponsesStream) -> AsyncIterator[bytes]:
    parser = generation.parser()
    for name, payload in builder.start():
        yield sse.encode(payload, event=name)
    async for event in generation.events():
        if isinstance(event, Delta):
            out = (
                builder.delta(event.text)
                if parser is None
                else response_pieces(builder, parser.feed(event.text))
            )
        elif isinstance(event, Done):
            status, reason = outcome(event)
            out = [] if parser is None else response_pieces(builder, parser.flush())
            out += builder.finish(usage=usage_of(event), status=status, incomplete_reason=reason)
        else:
            out = builder.fail(event.message)
        for name, payload in out:
            yield sse.encode(payload, event=name)


def response_pieces(
    builder: ResponsesStream, pieces: list[toolcalls.Piece]
) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out += builder.delta(piece)
        elif piece.name is not None:
            assert piece.id is not None
            out += builder.function_call(call_id=piece.id, name=piece.name)
            out += builder.arguments(piece.arguments)
        else:
            out += builder.arguments(piece.arguments)
    return out


def error_response(exc: CortexError) -> Response:
    """``exc`` as an answer (the request id header is added after each request)."""
    status, body, headers = envelope.error_parts(exc)
    g.error = exc  # for the request's log line (add_request_id)
    response = Response(body, status=status, content_type="application/json")
    response.headers.update(headers)
    return response


def event_stream(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    # Quart's default RESPONSE_TIMEOUT (60 s) would cut long generations.
    response.timeout = None
    return response
