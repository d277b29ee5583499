"""A scripted fake neuron and a running gateway in front of fakes, for gateway tests.

``FakeNeuron`` implements the neuron API (discovery, health, models, load,
unload, tokenize, the OpenAI endpoints) with canned answers: the reply is
``FakeNeuron.reply`` split into one chunk per word. It records what it was
asked, can hold loads and requests on Events, and can be scripted to fail:
``fault`` is one of ``FAULTS``.

``running_fleet`` serves a gateway in front of fakes; ``gateway_app`` gives
the gateway's ASGI app itself, for clients no HTTP library plays on cue
(one that leaves while the response head is being sent).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio

from cortex.config import (
    CatalogModel,
    EvictionSection,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
    RoutingSection,
)
from cortex.errors import CortexError
from cortex.fleet import make_converter
from cortex.gateway.app import Gateway, GatewayHandle, create_app, make_client, run_gateway
from cortex.gateway.poller import poll_neuron, refresh
from cortex.gateway.state import FleetState
from cortex.gateway.upstream import NeuronAPI
from cortex.serve import serve

FAULTS = (
    "die_before_first_byte",  # headers maybe, then the connection drops
    "die_mid_stream",  # `mid` chunks (2), then the connection drops
    "hang_before_first_byte",  # never sends a byte of body
    "hang_mid_stream",  # `mid` chunks, then nothing
    "error_chunk",  # `mid` chunks, then an OpenAI error object
    "end_mid_stream",  # `mid` chunks, then the body ends cleanly (no finish, no [DONE])
)

CREATED = 1_700_000_000


def _error(status: int, message: str, code: str | None = None, kind: str = "") -> Response:
    body = {
        "error": {
            "message": message,
            "type": kind or ("invalid_request_error" if status < 500 else "server_error"),
            "param": None,
            "code": code,
        }
    }
    return Response(json.dumps(body), status=status, content_type="application/json")


def words_of(messages: Any) -> int:
    """The fake's token count: words in every message's text."""
    count = 0
    for message in messages or ():
        content = message.get("content")
        if isinstance(content, str):
            count += len(content.split())
        elif isinstance(content, list):
            count += sum(len(str(p.get("text", "")).split()) for p in content)
    return count


@attrs.define(eq=False)
class FakeNeuron:
    name: str
    #: Host memory for models (CPU host) when ``gpus`` is empty.
    memory_mb: int = 8000
    #: VRAM per GPU; non-empty makes this a GPU host.
    gpus: list[int] = attrs.field(factory=list)
    token: str | None = None
    #: Memory each model takes when loaded here (default 100).
    sizes: dict[str, int] = attrs.field(factory=dict)
    #: Models loaded at start.
    preload: list[str] = attrs.field(factory=list)
    reply: str = "Hello from the fake neuron"
    fault: str | None = None
    #: When set, loads wait for it.
    load_gate: trio.Event | None = None
    #: When set, inference requests wait for it before answering.
    hold: trio.Event | None = None
    #: When set, streams wait for it after their first ``mid`` chunks.
    hold_mid: trio.Event | None = None
    #: The chunks a stream sends before a ``*_mid_stream`` or ``error_chunk``
    #: fault, or ``hold_mid``.
    mid: int = 2
    #: Model ids whose load fails.
    failing: set[str] = attrs.field(factory=set)
    #: What a refusal for want of memory says a model needs, as a real
    #: neuron's does (``insufficient_memory``, "needs at least N MiB"); a
    #: model not in here is refused with a bare 503.
    needs: dict[str, int] = attrs.field(factory=dict)
    #: Load options this engine does not take: a load naming one is a 400.
    refuse_options: set[str] = attrs.field(factory=set)
    #: The ``parallel`` (slots) each loaded model reports.
    parallel: int = 1
    #: Seconds its requests in flight get to finish once ``shutdown`` is set.
    grace_period: float = 0.2
    #: While True, every new request waits for ``thaw`` (a process under SIGSTOP).
    frozen: bool = False
    thaw: trio.Event = attrs.field(factory=trio.Event)

    loaded: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    loading: dict[str, trio.Event] = attrs.field(factory=dict)
    in_flight: dict[str, int] = attrs.field(factory=dict)
    load_calls: list[dict[str, Any]] = attrs.field(factory=list)
    unload_calls: list[str] = attrs.field(factory=list)
    #: (path, body, headers) of each inference and tokenize request.
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = attrs.field(factory=list)
    #: The exact bytes of each answer body sent, in order.
    sent: list[bytes] = attrs.field(factory=list)
    load_started: trio.Event = attrs.field(factory=trio.Event)
    request_arrived: trio.Event = attrs.field(factory=trio.Event)
    shutdown: trio.Event = attrs.field(factory=trio.Event)
    #: Set once the server has stopped after ``shutdown``.
    stopped: trio.Event = attrs.field(factory=trio.Event)
    url: str = ""
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        for model_id in self.preload:
            self._mark_loaded(model_id, [])

    # -- state ----------------------------------------------------------------

    def size(self, model_id: str) -> int:
        return self.sizes.get(model_id, 100)

    def _mark_loaded(self, model_id: str, devices: list[int]) -> None:
        if self.gpus and not devices:
            devices = [0]
        self.loaded[model_id] = {
            "id": model_id,
            "harness": "fake",
            "status": "loaded",
            "devices": devices,
            "memory_mb": self.size(model_id),
            "loaded_at": time.time(),
            "last_used": None,
            "in_flight": 0,
            "queued": 0,
            "n_ctx": 4096,
            "parallel": self.parallel,
            "error": None,
        }

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def used(self, device: int | None = None) -> int:
        total = 0
        for status in self.loaded.values():
            if device is None:
                total += status["memory_mb"]
            elif device in status["devices"]:
                total += status["memory_mb"] // len(status["devices"])
        return total

    def discovery(self) -> dict[str, Any]:
        return {
            "hostname": self.name,
            "os": "Linux",
            "kernel": "6.0",
            "cpu": {"model": "fake", "cores": 2},
            "ram_total_mb": self.memory_mb,
            "cuda_version": "12.4" if self.gpus else None,
            "driver_version": "550" if self.gpus else None,
            "devices": [
                {
                    "index": i,
                    "uuid": f"GPU-{self.name}-{i}",
                    "name": "Fake GPU",
                    "vram_total_mb": vram,
                    "compute_capability": "8.9",
                }
                for i, vram in enumerate(self.gpus)
            ],
            "harnesses": [{"name": "fake", "version": "1", "formats": ["gguf"], "cuda": False}],
        }

    def health(self) -> dict[str, Any]:
        return {
            "uptime_secs": 1.0,
            "devices": [
                {
                    "index": i,
                    "vram_used_mb": self.used(i),
                    "vram_free_mb": vram - self.used(i),
                    "utilization_pct": 0,
                    "temp_c": 40,
                }
                for i, vram in enumerate(self.gpus)
            ],
            "memory": {
                "total_mb": self.memory_mb,
                "used_mb": 0 if self.gpus else self.used(),
                "free_mb": self.memory_mb - (0 if self.gpus else self.used()),
            },
            "activation": {"in_progress": [], "pending": [], "failed": []},
            "queue_depth": 0,
            "in_flight": sum(self.in_flight.values()),
        }

    def models(self) -> list[dict[str, Any]]:
        out = [dict(s, in_flight=self.in_flight.get(i, 0)) for i, s in self.loaded.items()]
        out += [
            {"id": i, "harness": "fake", "status": "loading", "devices": [], "memory_mb": 0}
            for i in self.loading
        ]
        return out

    # -- answers --------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> tuple[list[str], str, str | None]:
        """The words to send, the finish reason and the matched stop string."""
        text = self.reply
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        matched = None
        for s in stop:
            if s in text:
                text, matched = text[: text.index(s)], s
                break
        words = [w + " " for w in text.split()]
        if words:
            words[-1] = words[-1].rstrip()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if limit is not None and len(words) > limit:
            return words[:limit], "length", None
        return words, "stop", matched

    def chat_chunks(self, body: dict[str, Any], words: list[str], finish: str, matched: str | None):
        ids = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED}
        usage_on = bool((body.get("stream_options") or {}).get("include_usage"))
        frames = []
        for n, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if n == 0 else {"content": word}
            chunk = {**ids, "model": body["model"], "choices": [{"index": 0, "delta": delta}]}
            if usage_on:
                chunk["usage"] = None
            frames.append(chunk)
        final: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish}
        if matched is not None:
            final["stop_sequence"] = matched
        frames.append({**ids, "model": body["model"], "choices": [final]})
        if usage_on:
            frames.append(
                {
                    **ids,
                    "model": body["model"],
                    "choices": [],
                    "usage": self.usage(body, len(words)),
                }
            )
        return [f"data: {json.dumps(f)}\n\n".encode() for f in frames] + [b"data: [DONE]\n\n"]

    @staticmethod
    def response_events(answer: dict[str, Any], words: list[str]) -> list[bytes]:
        """A Responses stream of ``answer``, one event a frame, as the neuron sends it."""
        started = {**answer, "status": "in_progress", "output": [], "usage": None}
        item = answer["output"][0]
        opened = {**item, "status": "in_progress", "content": []}
        place = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        part = item["content"][0]
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {"type": "response.output_item.added", "output_index": 0, "item": opened},
            {"type": "response.content_part.added", **place, "part": {**part, "text": ""}},
            *({"type": "response.output_text.delta", **place, "delta": w} for w in words),
            {"type": "response.output_text.done", **place, "text": part["text"]},
            {"type": "response.content_part.done", **place, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": answer},
        ]
        return [
            f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
            for n, e in enumerate(events)
        ]

    def usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = words_of(body.get("messages")) or len(str(body.get("prompt", "")).split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def completion(self, body: dict[str, Any], words: list[str], finish: str, matched: str | None):
        message = {"role": "assistant", "content": "".join(words)}
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": finish,
            "logprobs": None,
        }
        if matched is not None:
            choice["stop_sequence"] = matched
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": CREATED,
            "model": body["model"],
            "choices": [choice],
            "usage": self.usage(body, len(words)),
        }


def create_fake_app(fake: FakeNeuron) -> QuartTrio:
    app = QuartTrio("fake-neuron")

    @app.before_request
    async def authenticate() -> Response | None:
        if fake.frozen:
            await fake.thaw.wait()
        if fake.token and request.headers.get("authorization") != f"Bearer {fake.token}":
            return _error(401, "bad token", kind="authentication_error")
        return None

    @app.get("/discovery")
    async def discovery() -> Any:
        return fake.discovery()

    @app.get("/health")
    async def health() -> Any:
        return fake.health()

    @app.get("/models")
    async def models() -> Any:
        return fake.models()

    @app.post("/models/load")
    async def load() -> Any:
        body = await request.get_json()
        model_id = body["model_id"]
        if model_id in fake.loaded:
            return {"status": "loaded", "model": fake.loaded[model_id]}
        if model_id in fake.loading:
            await fake.loading[model_id].wait()
        else:
            done = fake.loading[model_id] = trio.Event()
            fake.load_calls.append(body)
            fake.load_started.set()
            try:
                if fake.load_gate is not None:
                    await fake.load_gate.wait()
                devices = body.get("devices") or []
                free = fake.memory_mb - fake.used() if not fake.gpus else None
                if model_id in fake.failing:
                    return _error(500, f"cannot load {model_id}: corrupt file")
                refused = sorted(set(body.get("options") or {}) & fake.refuse_options)
                if refused:
                    return _error(400, f"unknown option {refused[0]!r}", "invalid_model_options")
                if free is not None and fake.size(model_id) > free:
                    if model_id in fake.needs:
                        return _error(
                            503,
                            f"not enough memory for {model_id!r}: needs at least "
                            f"{fake.needs[model_id]} MiB, {free} MiB free",
                            "insufficient_memory",
                            "service_unavailable",
                        )
                    return _error(503, f"no memory for {model_id}", kind="service_unavailable")
                fake._mark_loaded(model_id, devices)
            finally:
                del fake.loading[model_id]
                done.set()
                fake._changed_now()
        if model_id not in fake.loaded:
            return _error(500, f"cannot load {model_id}")
        return {"status": "loaded", "model": fake.loaded[model_id]}

    @app.post("/models/unload")
    async def unload() -> Any:
        body = await request.get_json()
        model_id = body["model_id"]
        if model_id not in fake.loaded:
            return _error(404, f"{model_id} is not loaded", code="model_not_found")
        fake.unload_calls.append(model_id)
        while fake.in_flight.get(model_id):
            await fake._changed.wait()
        del fake.loaded[model_id]
        return {"status": "unloaded", "cancelled": 0}

    @app.post("/tokenize")
    async def tokenize() -> Any:
        body = await request.get_json()
        fake.requests.append(
            ("/tokenize", body, {k.lower(): v for k, v in request.headers.items()})
        )
        if body["model"] not in fake.loaded:
            return _error(404, "not loaded", code="model_not_found")
        return {"count": words_of(body.get("messages"))}

    async def inference() -> Any:
        path = request.path
        body = await request.get_json()
        fake.requests.append((path, body, {k.lower(): v for k, v in request.headers.items()}))
        fake.request_arrived.set()
        model_id = body.get("model")
        if model_id not in fake.loaded:
            return _error(404, f"model {model_id} is not loaded", code="model_not_found")
        fake.in_flight[model_id] = fake.in_flight.get(model_id, 0) + 1
        fake.loaded[model_id]["last_used"] = time.time()
        words, finish, matched = fake.answer(body)
        stream = body.get("stream") is True
        if path == "/v1/chat/completions":
            frames = (
                fake.chat_chunks(body, words, finish, matched)
                if stream
                else [json.dumps(fake.completion(body, words, finish, matched)).encode()]
            )
        elif path == "/v1/completions":
            answer = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": CREATED,
                "model": model_id,
                "choices": [
                    {"index": 0, "text": "".join(words), "finish_reason": finish, "logprobs": None}
                ],
                "usage": fake.usage(body, len(words)),
            }
            frames = (
                [f"data: {json.dumps(answer)}\n\n".encode(), b"data: [DONE]\n\n"]
                if stream
                else [json.dumps(answer).encode()]
            )
        else:
            answer = {
                "id": "resp_fake",
                "object": "response",
                "created_at": CREATED,
                "status": "completed",
                "model": model_id,
                "output": [
                    {
                        "type": "message",
                        "id": "msg_fake",
                        "status": "completed",
                        "role": "assistant",
                        "content": [
                            {"type": "output_text", "text": "".join(words), "annotations": []}
                        ],
                    }
                ],
                "usage": {
                    "input_tokens": 3,
                    "output_tokens": len(words),
                    "total_tokens": 3 + len(words),
                },
            }
            frames = (
                fake.response_events(answer, words) if stream else [json.dumps(answer).encode()]
            )
        sent = bytearray()
        fake.sent.append(b"")
        index = len(fake.sent) - 1

        async def body_iter() -> AsyncIterator[bytes]:
            try:
                if fake.hold is not None:
                    await fake.hold.wait()
                for n, frame in enumerate(frames):
                    if n == 0 and fake.fault == "die_before_first_byte":
                        raise RuntimeError("fake neuron dies before its first byte")
                    if n == 0 and fake.fault == "hang_before_first_byte":
                        await trio.sleep_forever()
                    if n == fake.mid and fake.hold_mid is not None:
                        await fake.hold_mid.wait()
                    if n == fake.mid and fake.fault == "die_mid_stream":
                        raise RuntimeError("fake neuron dies mid-stream")
                    if n == fake.mid and fake.fault == "hang_mid_stream":
                        await trio.sleep_forever()
                    if n == fake.mid and fake.fault == "end_mid_stream":
                        return
                    if n == fake.mid and fake.fault == "error_chunk":
                        frame = (
                            b'data: {"error": {"message": "generation failed", '
                            b'"type": "server_error", "param": null, "code": null}}\n\n'
                        )
                        sent.extend(frame)
                        fake.sent[index] = bytes(sent)
                        yield frame
                        return
                    sent.extend(frame)
                    fake.sent[index] = bytes(sent)
                    yield frame
                    await trio.lowlevel.checkpoint()
            finally:
                fake.in_flight[model_id] -= 1
                fake._changed_now()

        content_type = "text/event-stream" if stream else "application/json"
        response = Response(body_iter(), content_type=content_type)
        response.timeout = None
        return response

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        app.add_url_rule(path, path, inference, methods=["POST"])

    return app


async def start_fake(
    fake: FakeNeuron, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``fake`` on 127.0.0.1:0 until ``fake.shutdown`` is set."""

    try:
        async with trio.open_nursery() as nursery:
            fake.url = await nursery.start(
                partial(
                    serve,
                    create_fake_app(fake),
                    "127.0.0.1:0",
                    default_port=0,
                    shutdown_trigger=fake.shutdown.wait,
                    grace_period=fake.grace_period,
                )
            )
            task_status.started(fake.url)
    finally:
        fake.stopped.set()


def catalogue(*models: CatalogModel, aliases: dict[str, str] | None = None) -> ModelsFile:
    return ModelsFile(models=list(models), aliases=aliases or {})


@attrs.define(eq=False)
class Fleet:
    handle: GatewayHandle
    fakes: dict[str, FakeNeuron]
    client: httpx.AsyncClient
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return self.handle.api_url

    @property
    def state(self) -> FleetState:
        return self.handle.state

    async def refresh(self) -> None:
        """Poll every neuron now (the tests' poll interval is an hour)."""
        api = NeuronAPI(
            client=self.client,
            converter=make_converter(),
            call_timeout=httpx.Timeout(5.0),
            load_timeout=httpx.Timeout(5.0),
        )
        for neuron in self.state.neurons.values():
            try:
                await refresh(api, self.state, neuron)
            except CortexError:
                pass

    async def chat(self, model: str, text: str = "hi there", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)


def _config(
    fakes: list[FakeNeuron],
    strategy: str,
    routing: dict[str, Any] | None,
    section: dict[str, Any],
) -> GatewayConfig:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "poll_interval": 3600.0,
        "discovery_interval": 3600.0,
        "grace_period": 1.0,
        "connect_timeout": 2.0,
        "first_byte_timeout": 10.0,
        "idle_timeout": 10.0,
        "load_timeout": 10.0,
    }
    settings.update(section)
    return GatewayConfig(
        gateway=GatewaySection(**settings),
        eviction=EvictionSection(strategy=strategy),  # type: ignore[arg-type]
        routing=RoutingSection(**(routing or {})),
        neurons=[NeuronEndpoint(f.name, f.url, f.token) for f in fakes],
    )


@asynccontextmanager
async def running_fleet(
    fakes: list[FakeNeuron],
    models: ModelsFile,
    *,
    strategy: str = "lru",
    routing: dict[str, Any] | None = None,
    **section: Any,
) -> AsyncIterator[Fleet]:
    """Fakes on port 0 and a gateway in front of them; everything stops on exit.

    ``routing``: cortex.toml's [routing] keys; ``section``: [gateway] keys.
    """
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            await nursery.start(start_fake, fake)
        config = _config(fakes, strategy, routing, section)
        shutdown = trio.Event()
        handle = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
        await handle.state.wait_polled()
        async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as client:
            try:
                yield Fleet(handle, {f.name: f for f in fakes}, client, shutdown)
            finally:
                shutdown.set()
                for fake in fakes:
                    fake.shutdown.set()


@attrs.define
class Answer:
    """What the gateway's app sent for one ASGI call."""

    status: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b""


@attrs.define(eq=False)
class GatewayApp:
    gateway: Gateway
    app: Any

    async def call(
        self,
        path: str,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        leave_at_head: bool = False,
    ) -> Answer:
        """POST ``body`` to ``path`` through the app, as hypercorn would.

        ``leave_at_head``: the client goes away while the response head is
        being sent: that ``send`` never completes and ``receive`` then
        reports the disconnect.
        """
        content = json.dumps(body).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"gateway"),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(content)),
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 31313),
        }
        answer = Answer()
        head_sent = trio.Event()
        body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": content, "more_body": False}
            if not leave_at_head:
                await trio.sleep_forever()
            await head_sent.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = {k.decode(): v.decode() for k, v in message["headers"]}
                if leave_at_head:
                    head_sent.set()
                    await trio.sleep_forever()
            elif message["type"] == "http.response.body":
                answer.body += message.get("body", b"")

        await self.app(scope, receive, send)
        return answer


@asynccontextmanager
async def gateway_app(
    fakes: list[FakeNeuron],
    models: ModelsFile,
    *,
    strategy: str = "lru",
    routing: dict[str, Any] | None = None,
    **section: Any,
) -> AsyncIterator[GatewayApp]:
    """Fakes on port 0 and a gateway's ASGI app over them, with no server of its own."""
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            await nursery.start(start_fake, fake)
        config = _config(fakes, strategy, routing, section)
        async with make_client(config) as client:
            gateway = Gateway.build(config, models, client)
            await nursery.start(gateway.router.loader.run)
            await nursery.start(gateway.router.preloader.run)
            await nursery.start(gateway.proxy.watch_fleet)
            for neuron in gateway.state.neurons.values():
                nursery.start_soon(
                    partial(
                        poll_neuron,
                        gateway.api,
                        gateway.state,
                        neuron,
                        config.gateway,
                        gateway.metrics,
                    )
                )
            await gateway.state.wait_polled()
            try:
                yield GatewayApp(gateway, create_app(gateway))
            finally:
                nursery.cancel_scope.cancel()
                gateway.proxy.close()
