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
from collections.abc import AsyncIterator, Iterable, Sequence
from functools import partial
from typing import Any

import attrs
import pluggy
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from cortex import toolcalls
from cortex.config import NeuronConfig
from cortex.errors import (
    ContextOverflow,
    CortexError,
    GenerationFailed,
    InvalidRequest,
    Unauthorized,
    Unavailable,
    error_for_status,
)
from cortex.fleet import DeviceSample, Discovery, Health, MemoryBudget, make_converter
from cortex.harness import ChatPrompt, Sampling, harness_infos, plugin_manager
from cortex.neuron import discovery
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.models import LoadRequest, ModelManager, ModelSlot
from cortex.neuron.tools import PLAIN, OutputPlan, plan_output
from cortex.neuron.workers import (
    Delta,
    Done,
    Failed,
    GenerationRequest,
    Job,
    collect,
    tokens_per_second,
)
from cortex.serve import serve
from cortex.wire import envelope, jsonbody, openai, responses, sse

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
            async with trio.open_nursery() as server:
                url = await server.start(
                    partial(
                        serve,
                        create_app(neuron),
                        section.listen,
                        default_port=DEFAULT_PORT,
                        shutdown_trigger=shutdown.wait,
                        grace_period=section.grace_period,
                    )
                )
                task_status.started(NeuronHandle(url=url, neuron=neuron))
            # The server has drained: nothing can reach the models any more.
            # Stop activating first, or it would load models behind unload_all.
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
    converter = make_converter()
    manager = neuron.manager
    token = neuron.config.neuron.token

    @app.before_request
    async def read_whole_body() -> None:
        # Before authenticating: a 401 sent with the body unread leaves the
        # keep-alive connection's next request hanging now and then
        # (quart-trio under hypercorn). Bounded by MAX_CONTENT_LENGTH.
        await request.get_data()

    @app.before_request
    async def authenticate() -> None:
        # The gateway passes its request id on; a direct client may not send one.
        g.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if token is None:
            return
        if neuron.config.neuron.open_health and request.path in HEALTH_ROUTES:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong neuron token (Authorization: Bearer ...)")

    @app.after_request
    async def add_request_id(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers["x-request-id"] = request_id
        if request.path.startswith("/v1/") or request.method == "POST":
            log.info(
                "%s %s %d request_id=%s",
                request.method,
                request.path,
                response.status_code,
                request_id,
            )
        return response

    @app.errorhandler(CortexError)
    async def cortex_error(exc: CortexError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return error_response(error_for_status(exc.code or 500, exc.description or exc.name))

    # -- fleet API: what the gateway calls --------------------------------------------

    @app.get("/discovery")
    async def get_discovery() -> Any:
        return converter.unstructure(neuron.discovery)

    @app.get("/health")
    async def get_health() -> Any:
        return converter.unstructure(neuron.health())

    @app.get("/models")
    async def list_models() -> Any:
        return converter.unstructure(manager.statuses())

    @app.post("/models/load")
    async def load_model() -> Any:
        load = LoadRequest.from_json(await read_json())
        slot = await manager.load(load)
        return {"status": "loaded", "model": converter.unstructure(slot.status_view())}

    @app.post("/models/unload")
    async def unload_model() -> Any:
        body = await read_json()
        model_id = body.get("model_id") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("model_id must be a non-empty string", param="model_id")
        cancel = body.get("cancel", False)
        if not isinstance(cancel, bool):
            raise InvalidRequest("cancel must be a boolean", param="cancel")
        cancelled = await manager.unload(model_id, cancel=cancel)
        return {"status": "unloaded", "model_id": model_id, "cancelled": cancelled}

    @app.get("/models/<path:model_id>/endpoint")
    async def model_endpoint(model_id: str) -> Any:
        manager.serving(model_id)
        return {"url": request.host_url.rstrip("/") + "/v1"}

    @app.post("/tokenize")
    async def tokenize() -> Any:
        body = await read_json()
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise InvalidRequest("model must be a string", param="model")
        with manager.using(body["model"]) as slot:
            return await count_tokens(slot, body)

    async def count_tokens(slot: ModelSlot, body: dict[str, Any]) -> dict[str, Any]:
        model = slot.model
        assert model is not None
        if "messages" in body:
            chat = openai.parse_chat_request(
                {"model": body["model"], "messages": body["messages"], "tools": body.get("tools")}
            )
            prompt = await trio.to_thread.run_sync(
                partial(model.render_chat, chat.messages, tools=chat.tools)
            )
            tokens = await trio.to_thread.run_sync(
                partial(model.tokenize, prompt.text, add_bos=prompt.add_bos, special=prompt.special)
            )
            return {"count": len(tokens)}
        text = body.get("text")
        if not isinstance(text, str):
            raise InvalidRequest("give text (a string) or messages", param="text")
        tokens = await trio.to_thread.run_sync(partial(model.tokenize, text, add_bos=False))
        return {"count": len(tokens), "tokens": tokens}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(neuron.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    # -- inference: OpenAI dialect ----------------------------------------------------

    @app.get("/v1/models")
    async def v1_models() -> Any:
        return openai.model_list(
            [
                openai.model_entry(
                    s.id, created=int(s.loaded_at or 0), owned_by="cortex", status=s.status
                )
                for s in manager.statuses()
                if s.status == "loaded"
            ]
        )

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        arrived = time.perf_counter()
        chat = openai.parse_chat_request(await read_json())
        slot, plan, job = await start_chat(
            chat, max_tokens=chat.max_tokens, stops=chat.stop, endpoint="chat"
        )
        ids = dict(id=openai.new_id("chatcmpl"), created=openai.now(), model=chat.model)
        if plan.family is not None:
            return await chat_with_tools(slot, job, arrived, chat, plan.family, ids)
        if not chat.stream:
            text, done = await finish(slot, job, arrived)
            return openai.chat_completion(
                **ids,
                content=text,
                finish_reason=done.finish_reason,
                usage=usage_of(done),
                stop_sequence=done.stop_sequence,
            )

        async def events() -> AsyncIterator[bytes]:
            first = True
            async for event in stream(slot, job, arrived):
                if isinstance(event, Delta):
                    # The role rides with the first text: a role-only chunk sent
                    # before any token would fake the time to first token.
                    delta = (
                        {"role": "assistant", "content": event.text}
                        if first
                        else {"content": event.text}
                    )
                    first = False
                    yield sse.encode(
                        openai.chat_chunk(**ids, delta=delta, include_usage=chat.include_usage)
                    )
                elif isinstance(event, Done):
                    delta = {"role": "assistant", "content": ""} if first else {}
                    yield sse.encode(
                        openai.chat_chunk(
                            **ids,
                            delta=delta,
                            finish_reason=event.finish_reason,
                            stop_sequence=event.stop_sequence,
                            include_usage=chat.include_usage,
                        )
                    )
                    if chat.include_usage:
                        yield sse.encode(openai.usage_chunk(**ids, usage=usage_of(event)))
                    yield sse.DONE
                else:
                    yield sse.encode(openai.error_body(GenerationFailed(event.message)))

        return event_stream(events())

    async def chat_with_tools(
        slot: ModelSlot,
        job: Job,
        arrived: float,
        chat: openai.ChatRequest,
        family: str,
        ids: dict[str, Any],
    ) -> Any:
        """A chat answer whose text is read for tool calls in ``family``'s markup."""
        if not chat.stream:
            text, done = await finish(slot, job, arrived)
            content, calls = toolcalls.parse_tool_calls(text, family)
            finish_reason, stop_sequence = tool_finish(done, calls)
            return openai.chat_completion(
                **ids,
                content=content or (None if calls else ""),
                tool_calls=[call.to_openai() for call in calls],
                finish_reason=finish_reason,
                usage=usage_of(done),
                stop_sequence=stop_sequence,
            )

        async def events() -> AsyncIterator[bytes]:
            parser = toolcalls.ToolCallParser(family)
            first = True
            async for event in stream(slot, job, arrived):
                if isinstance(event, Failed):
                    yield sse.encode(openai.error_body(GenerationFailed(event.message)))
                    continue
                pieces = parser.feed(event.text) if isinstance(event, Delta) else parser.flush()
                for piece in pieces:
                    if isinstance(piece, str):
                        delta: dict[str, Any] = {"content": piece}
                    else:
                        delta = {"tool_calls": [piece.to_openai()]}
                    if first:
                        # As in plain chat: the role rides with the first piece.
                        delta = {"role": "assistant", "content": None, **delta}
                        first = False
                    yield sse.encode(
                        openai.chat_chunk(**ids, delta=delta, include_usage=chat.include_usage)
                    )
                if isinstance(event, Done):
                    finish_reason, stop_sequence = tool_finish(event, parser.calls)
                    yield sse.encode(
                        openai.chat_chunk(
                            **ids,
                            delta={"role": "assistant", "content": ""} if first else {},
                            finish_reason=finish_reason,
                            stop_sequence=stop_sequence,
                            include_usage=chat.include_usage,
                        )
                    )
                    if chat.include_usage:
                        yield sse.encode(openai.usage_chunk(**ids, usage=usage_of(event)))
                    yield sse.DONE

        return event_stream(events())

    @app.post("/v1/completions")
    async def completions() -> Any:
        arrived = time.perf_counter()
        req = openai.parse_completion_request(await read_json())
        with manager.using(req.model) as slot:
            prompts = []
            for prompt in req.prompts:
                if isinstance(prompt, str):
                    prompts.append(await tokenize_text(slot, prompt))
                else:
                    prompts.append(list(prompt))
        ids = dict(id=openai.new_id("cmpl"), created=openai.now(), model=req.model)
        sampling = req.sampling.apply({})

        async def run(tokens: list[int]) -> Job:
            return await submit(
                slot,
                prompt_tokens=tokens,
                max_tokens=req.max_tokens,
                sampling=sampling,
                stops=req.stop,
                template_stops=(),
                endpoint="completions",
            )

        if not req.stream:
            results = [await finish(slot, await run(tokens), arrived) for tokens in prompts]
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

        first_job = await run(prompts[0])

        async def events() -> AsyncIterator[bytes]:
            prompt_total = completion_total = cached_total = 0
            for index, tokens in enumerate(prompts):
                try:
                    job = first_job if index == 0 else await run(tokens)
                except CortexError as exc:  # unloaded, or the queue filled meanwhile
                    yield sse.encode(openai.error_body(exc))
                    return
                async for event in stream(slot, job, arrived):
                    if isinstance(event, Delta):
                        yield sse.encode(
                            openai.completion_chunk(
                                **ids,
                                text=event.text,
                                index=index,
                                include_usage=req.include_usage,
                            )
                        )
                    elif isinstance(event, Done):
                        prompt_total += event.prompt_tokens
                        completion_total += event.completion_tokens
                        cached_total += event.cached_tokens
                        yield sse.encode(
                            openai.completion_chunk(
                                **ids,
                                text="",
                                index=index,
                                finish_reason=event.finish_reason,
                                stop_sequence=event.stop_sequence,
                                include_usage=req.include_usage,
                            )
                        )
                    else:
                        yield sse.encode(openai.error_body(GenerationFailed(event.message)))
                        return
            if req.include_usage:
                usage = openai.Usage(
                    prompt_tokens=prompt_total,
                    completion_tokens=completion_total,
                    cached_tokens=cached_total,
                )
                chunk = openai.usage_chunk(**ids, usage=usage)
                chunk["object"] = "text_completion"
                yield sse.encode(chunk)
            yield sse.DONE

        return event_stream(events())

    @app.post("/v1/responses")
    async def create_response() -> Any:
        arrived = time.perf_counter()
        req = responses.parse_responses_request(await read_json())
        slot, plan, job = await start_chat(
            req, max_tokens=req.max_output_tokens, stops=(), endpoint="responses"
        )
        response_id, created_at = "resp_" + uuid.uuid4().hex, openai.now()
        if not req.stream:
            text, done = await finish(slot, job, arrived)
            calls: list[toolcalls.ToolCall] = []
            if plan.family is not None:
                text, calls = toolcalls.parse_tool_calls(text, plan.family)
            status, reason = outcome(done)
            return responses.response_object(
                id=response_id,
                created_at=created_at,
                model=req.model,
                text=text,
                status=status,
                usage=usage_of(done),
                incomplete_reason=reason,
                message_id=responses.new_message_id(),
                function_calls=[
                    responses.function_call_item(
                        id=responses.new_function_call_id(),
                        call_id=call.id,
                        name=call.name,
                        arguments=call.arguments,
                        status=status,
                    )
                    for call in calls
                ],
            )
        builder = responses.ResponsesStream(id=response_id, created_at=created_at, model=req.model)
        parser = toolcalls.ToolCallParser(plan.family) if plan.family is not None else None

        def output(pieces: list[toolcalls.Piece]) -> list[tuple[str, dict[str, Any]]]:
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

        async def events() -> AsyncIterator[bytes]:
            for name, payload in builder.start():
                yield sse.encode(payload, event=name)
            async for event in stream(slot, job, arrived):
                if isinstance(event, Delta):
                    out = (
                        builder.delta(event.text)
                        if parser is None
                        else output(parser.feed(event.text))
                    )
                elif isinstance(event, Done):
                    status, reason = outcome(event)
                    out = [] if parser is None else output(parser.flush())
                    out += builder.finish(
                        usage=usage_of(event), status=status, incomplete_reason=reason
                    )
                else:
                    out = builder.fail(event.message)
                for name, payload in out:
                    yield sse.encode(payload, event=name)

        return event_stream(events())

    # -- helpers ----------------------------------------------------------------------

    async def read_json() -> Any:
        return jsonbody.loads(await request.get_data(cache=False))

    async def start_chat(
        req: openai.ChatRequest | responses.ResponsesRequest,
        *,
        max_tokens: int | None,
        stops: Sequence[str],
        endpoint: str,
    ) -> tuple[ModelSlot, OutputPlan, Job]:
        """Render, tokenize and queue a chat-shaped request (chat or Responses)."""
        with manager.using(req.model) as slot:
            plan = output_plan(slot, req)
            prompt = await render(slot, req.messages, plan.tools)
            job = await submit(
                slot,
                prompt_tokens=await tokenize_prompt(slot, prompt),
                max_tokens=max_tokens,
                sampling=constrained(req.sampling.apply({}), plan),
                stops=stops,
                template_stops=prompt.stop,
                endpoint=endpoint,
            )
        return slot, plan, job

    async def render(
        slot: ModelSlot, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> ChatPrompt:
        assert slot.model is not None
        return await trio.to_thread.run_sync(partial(slot.model.render_chat, messages, tools=tools))

    def output_plan(
        slot: ModelSlot, req: openai.ChatRequest | responses.ResponsesRequest
    ) -> OutputPlan:
        if req.tools is None and req.response_format is None:
            return PLAIN
        return plan_output(
            family=toolcalls.family_of(slot.model),
            tools=req.tools,
            tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
            response_format=req.response_format,
        )

    async def tokenize_prompt(slot: ModelSlot, prompt: ChatPrompt) -> list[int]:
        assert slot.model is not None
        return await trio.to_thread.run_sync(
            partial(
                slot.model.tokenize, prompt.text, add_bos=prompt.add_bos, special=prompt.special
            )
        )

    async def tokenize_text(slot: ModelSlot, text: str) -> list[int]:
        assert slot.model is not None
        return await trio.to_thread.run_sync(partial(slot.model.tokenize, text))

    async def submit(
        slot: ModelSlot,
        *,
        prompt_tokens: list[int],
        max_tokens: int | None,
        sampling: Sampling,
        stops: Sequence[str],
        template_stops: Sequence[str],
        endpoint: str,
    ) -> Job:
        # A request that got past serving() before an unload began still runs:
        # the unload waits for it (ModelManager.using) and then drains it.
        if slot.model is None or slot.worker is None:
            raise Unavailable(f"model {slot.id!r} is being unloaded", retry_after=2)
        room = slot.model.n_ctx - len(prompt_tokens)
        if room <= 0:
            # Anthropic's wording: Claude Code recognises it and compacts.
            raise ContextOverflow(
                f"prompt is too long: {len(prompt_tokens)} tokens > {slot.model.n_ctx} maximum "
                f"(the context of model {slot.id!r})",
                param="messages",
            )
        # Beyond what the context leaves, max_tokens is clamped (finish_reason
        # "length"), never rejected: clients such as Claude Code ask for 32000.
        # A request without one gets the configured default, not the whole
        # context (minutes of decoding for a runaway reply).
        if max_tokens is None:
            max_tokens = neuron.config.neuron.default_max_tokens
        limit = min(max_tokens, room)
        job = Job(
            GenerationRequest(
                tokens=prompt_tokens,
                sampling=sampling,
                max_tokens=limit,
                stops=tuple(stops),
                template_stops=tuple(template_stops),
            )
        )
        try:
            slot.worker.submit(job)
        except CortexError:
            neuron.metrics.rejected.labels(slot.id).inc()
            raise
        neuron.metrics.requests.labels(slot.id, endpoint).inc()
        try:
            # Before any answer is begun: a request the engine refuses is a
            # 4xx, not a 200 stream that ends in an error.
            await job.wait_admitted()
        except BaseException:
            job.close()
            raise
        return job

    async def stream(
        slot: ModelSlot, job: Job, arrived: float
    ) -> AsyncIterator[Delta | Done | Failed]:
        """The job's events; cancels the job if the consumer stops early."""
        first = True
        try:
            async for event in job.events:
                if first and isinstance(event, Delta):
                    first = False
                    observe_first_token(slot, arrived)
                if isinstance(event, Done):
                    observe_done(slot, job, event)
                yield event
                if not isinstance(event, Delta):
                    return
            # The worker closed the job without an ending: it was cancelled
            # (the model is being unloaded).
            yield Failed("generation cancelled: the model is being unloaded")
        finally:
            job.close()

    async def finish(slot: ModelSlot, job: Job, arrived: float) -> tuple[str, Done]:
        text, done = await collect(job)
        if done.completion_tokens:
            neuron.metrics.time_to_first_token.labels(slot.id).observe(
                time.perf_counter() - arrived - done.decode_seconds
            )
        observe_done(slot, job, done)
        return text, done

    def observe_first_token(slot: ModelSlot, arrived: float) -> None:
        neuron.metrics.time_to_first_token.labels(slot.id).observe(time.perf_counter() - arrived)

    def observe_done(slot: ModelSlot, job: Job, done: Done) -> None:
        # Counted here, as the answer ends, or by the worker if it never does
        # (ModelManager.on_job_finished): once either way.
        neuron.metrics.job_finished(slot.id, job)
        neuron.metrics.decode_rate(slot.id, tokens_per_second(done))

    return app


def constrained(sampling: Sampling, plan: OutputPlan) -> Sampling:
    if plan.constraint is None:
        return sampling
    return attrs.evolve(sampling, constraint=plan.constraint)


def tool_finish(done: Done, calls: Sequence[toolcalls.ToolCall]) -> tuple[str, str | None]:
    """The finish_reason and stop_sequence of an answer that may hold tool calls.

    A call cut short by the token limit stays ``length``: the client must not
    run it as if it were whole.
    """
    if calls and done.finish_reason != "length":
        return "tool_calls", None
    return done.finish_reason, done.stop_sequence


def usage_of(done: Done) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        cached_tokens=done.cached_tokens,
    )


def outcome(done: Done) -> tuple[str, str | None]:
    """A Responses status and incomplete reason for how generation ended."""
    if done.finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def error_response(exc: CortexError) -> Response:
    """``exc`` as an answer (the request id header is added after each request)."""
    status, body, headers = envelope.error_parts(exc)
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
