"""Property-based fuzzing of every route of both roles with bodies drawn from the request shapes.

A real neuron (the tiny GGUF model, llama.cpp) and a real gateway in front
of it serve on port 0; hypothesis runs in a worker thread and talks to them
over HTTP with a blocking client, so both servers keep running in the
test's trio loop. For every body: never a 5xx, an answer within the client
timeout (never a hang), the error envelope of the route's dialect, and both
servers still answering afterwards.

The keys of each body come from the request values the parsers build
(``ChatRequest``, ``SamplingOverrides``, ``MessagesRequest``, ...), each
with a strategy of plausible, boundary and junk values, plus junk keys and
whole bodies that are not requests at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.config import (
    CatalogModel,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
)
from cortex.gateway.app import run_gateway
from cortex.neuron import sources
from cortex.neuron.models import LoadRequest
from cortex.wire.anthropic import CountTokensRequest, MessagesRequest
from cortex.wire.openai import ChatRequest, CompletionRequest, SamplingOverrides
from cortex.wire.responses import ResponsesRequest
from cortex.wire.sse import SSEDecoder
from tests.neuron_helpers import running_neuron

#: Requests a route gets; small enough for the suite (about 15 s in all).
EXAMPLES = 12
#: Seconds an answer may take before it counts as a hang.
ANSWER_TIMEOUT = 30.0
MODEL = "tiny"

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    # CI replays the same examples every run (a red CI must be reproducible);
    # elsewhere each run draws new ones.
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=list(HealthCheck),
)

# -- values -----------------------------------------------------------------------------

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Numbers at and past the edges the parsers draw (32-bit token counts, 64-bit seeds).
EDGE_NUMBERS = st.sampled_from(
    [0, -1, 0.0, 16.0, 2.5, 2**31 - 1, 2**31, 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 1e-300]
)
TEXT = st.text(max_size=24) | st.sampled_from(["", "Hi", "<|im_end|>", "\x00", "é" * 20])


@attrs.frozen
class Field:
    """How to fill one body key: with a value the parser takes, or one it may refuse."""

    valid: st.SearchStrategy[Any]
    edge: st.SearchStrategy[Any] = attrs.field(factory=st.nothing)

    @property
    def spoiled(self) -> st.SearchStrategy[Any]:
        return self.edge | JSON


def number(low: float, high: float) -> Field:
    return Field(st.floats(low, high, allow_nan=False), EDGE_NUMBERS)


def integer(low: int, high: int) -> Field:
    return Field(st.integers(low, high), EDGE_NUMBERS)


CHAT_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["get_weather", "f"])},
            optional={
                "parameters": st.just(
                    {"type": "object", "properties": {"city": {"type": "string"}}}
                ),
                "description": TEXT,
            },
        ),
    }
)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
CHAT_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer"]),
        "content": TEXT | st.lists(TEXT_PART, min_size=1, max_size=2),
    }
)
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": st.just("t1"),
            "name": st.just("f"),
            "input": st.just({}),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": st.just("t1"), "content": TEXT}
    ),
)
ANTHROPIC_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": TEXT | st.lists(BLOCK, min_size=1, max_size=2),
    }
)
INPUT_ITEM = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": st.just("c1"),
            "name": st.just("f"),
            "arguments": st.just("{}"),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": st.just("c1"), "output": TEXT}
    ),
)
BOOL = Field(st.booleans())
TOKENS = Field(st.integers(1, 8), EDGE_NUMBERS)

#: Body keys, by name: what the parsers take and what sits at their edges.
FIELDS: dict[str, Field] = {
    "model": Field(st.just(MODEL), st.sampled_from(["no/such", "", "tiny "])),
    "max_tokens": TOKENS,
    "max_completion_tokens": TOKENS,
    "max_output_tokens": TOKENS,
    "stream": BOOL,
    "stream_options": Field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": Field(TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6)),
    "stop_sequences": Field(st.lists(TEXT, max_size=4)),
    "tools": Field(st.lists(CHAT_TOOL, max_size=2)),
    "tool_choice": Field(
        st.sampled_from(["auto", "none", "required"])
        | st.just({"type": "function", "function": {"name": "get_weather"}})
    ),
    "parallel_tool_calls": BOOL,
    "continue_final_message": BOOL,
    "response_format": Field(
        st.sampled_from(
            [
                {"type": "json_object"},
                {"type": "text"},
                {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "schema": {"type": "object"}},
                },
            ]
        )
    ),
    "logit_bias": Field(
        st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=2),
        st.dictionaries(st.text(max_size=4), EDGE_NUMBERS, min_size=1, max_size=2),
    ),
    "n": Field(st.just(1), EDGE_NUMBERS),
    "logprobs": Field(st.none(), st.sampled_from([True, 0, 5])),
    "echo": Field(st.just(False), st.just(True)),
    "suffix": Field(st.none(), TEXT),
    "best_of": Field(st.just(1), EDGE_NUMBERS),
    "user": Field(TEXT),
    "prompt": Field(
        TEXT | st.lists(st.integers(0, 200), min_size=1, max_size=4),
        st.lists(st.integers(-1, 2**32), min_size=1, max_size=4) | st.lists(TEXT, max_size=3),
    ),
    "messages": Field(st.lists(CHAT_MESSAGE, min_size=1, max_size=3)),
    "input": Field(TEXT.filter(bool) | st.lists(INPUT_ITEM, min_size=1, max_size=3)),
    "instructions": Field(TEXT),
    "text": Field(
        st.fixed_dictionaries(
            {"format": st.sampled_from([{"type": "json_object"}, {"type": "text"}])}
        )
    ),
    "store": BOOL,
    "previous_response_id": Field(st.none(), TEXT),
    "max_tool_calls": Field(st.integers(0, 3), EDGE_NUMBERS),
    "background": Field(st.just(False), st.just(True)),
    "top_logprobs": Field(st.just(0), EDGE_NUMBERS),
    "include": Field(
        st.just(["reasoning.encrypted_content"]), st.just(["message.output_text.logprobs"])
    ),
    "system": Field(
        TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
    ),
    "metadata": Field(st.fixed_dictionaries({"user_id": TEXT})),
    "temperature": number(0, 1),
    "top_p": number(0, 1),
    "top_k": integer(0, 50),
    "min_p": number(0, 1),
    "repeat_penalty": number(0.5, 1.5),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "seed": integer(0, 2**32),
}
#: The Anthropic dialect's own shapes for keys the OpenAI one also has.
ANTHROPIC_FIELDS = {
    **FIELDS,
    "messages": Field(st.lists(ANTHROPIC_MESSAGE, min_size=1, max_size=3)),
    "tools": Field(
        st.lists(
            st.fixed_dictionaries(
                {"name": st.just("f"), "input_schema": st.just({"type": "object"})}
            ),
            max_size=1,
        )
    ),
    "tool_choice": Field(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}])),
    "output_config": Field(
        st.sampled_from(
            [
                {"effort": "high"},
                {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            ]
        ),
        st.sampled_from([{"format": {"type": "xml"}}, {"format": {"type": "json_schema"}}, "x"]),
    ),
}


def shape_keys(
    *classes: type, drop: frozenset[str] = frozenset(), add: frozenset[str] = frozenset()
) -> set[str]:
    """Body keys of a route: its request values' fields, adjusted to the wire names."""
    keys = {field.name for cls in classes for field in attrs.fields(cls)}
    return (keys - drop) | add


def request(
    required: set[str], keys: set[str], fields: dict[str, Field] = FIELDS
) -> st.SearchStrategy[Any]:
    """Bodies of a route: valid ones with none, one or two keys spoiled; sometimes junk.

    Every key in ``keys`` must have a ``Field``: a new field of a request value
    fails here until the fuzzer knows how to fill it.
    """
    missing = sorted(keys - set(fields))
    assert not missing, f"no fuzz strategy for {missing}"
    valid = st.fixed_dictionaries(
        {key: fields[key].valid for key in sorted(required)},
        optional={key: fields[key].valid for key in sorted(keys - required)},
    )

    @st.composite
    def bodies(draw: st.DrawFn) -> Any:
        body = draw(valid)
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from([*sorted(keys), "unknown key"]))
            body[key] = draw(fields[key].spoiled if key in fields else JSON)
        return body

    return st.one_of(bodies(), bodies(), bodies(), bodies(), JSON)


SAMPLING = frozenset(f.name for f in attrs.fields(SamplingOverrides))
CHAT = request(
    {"model", "messages"},
    shape_keys(
        ChatRequest,
        drop=frozenset({"sampling", "include_usage"}),
        add=SAMPLING | {"stream_options", "max_completion_tokens", "n", "logprobs"},
    ),
)
COMPLETION = request(
    {"model", "prompt"},
    shape_keys(
        CompletionRequest,
        drop=frozenset({"sampling", "include_usage", "prompts"}),
        add=SAMPLING | {"prompt", "stream_options", "echo", "suffix", "best_of", "n", "logprobs"},
    ),
)
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def namespace_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "namespace", "name": "weather", "description": "Weather.", "tools": [tool]}


RESPONSES = request(
    {"model", "input"},
    shape_keys(
        ResponsesRequest,
        # namespaced is read from tools: its namespace tools.
        drop=frozenset({"sampling", "messages", "response_format", "echo", "namespaced"}),
        add=SAMPLING
        | {"input", "instructions", "text", "previous_response_id"}
        | {"background", "top_logprobs", "include"},
    ),
    {
        **FIELDS,
        "tools": Field(
            st.lists(st.just(RESPONSES_TOOL), max_size=1)
            | st.just([RESPONSES_TOOL, namespace_tool(RESPONSES_TOOL)]),
            st.sampled_from(
                [
                    [RESPONSES_TOOL, {"type": "web_search"}],
                    [namespace_tool({"type": "custom", "name": "patch"})],
                    [namespace_tool(RESPONSES_TOOL), namespace_tool(RESPONSES_TOOL)],
                ]
            ),
        ),
        "tool_choice": Field(st.sampled_from(["auto", "none"])),
    },
)
MESSAGES = request(
    {"model", "max_tokens", "messages"},
    # prefill is read from messages: a final assistant turn.
    shape_keys(
        MessagesRequest,
        drop=frozenset({"output_schema", "output_field", "prefill"}),
        add={"output_config"},
    ),
    ANTHROPIC_FIELDS,
)
COUNT = request(
    {"model", "messages"},
    shape_keys(CountTokensRequest, drop=frozenset({"prefill"})),
    ANTHROPIC_FIELDS,
)


# -- checks -----------------------------------------------------------------------------


def check_answer(response: httpx.Response, *, anthropic: bool) -> None:
    """No 5xx; errors in the dialect's envelope; a 200 stream without an error event."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    content_type = response.headers.get("content-type", "")
    if response.status_code >= 400:
        body = response.json()
        if anthropic:
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, where
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, where
        return
    if content_type.startswith("text/event-stream"):
        for event in SSEDecoder().feed(response.content):
            if event.data == "[DONE]":
                continue
            data = json.loads(event.data)
            failed = "error" in data if not anthropic else data.get("type") == "error"
            assert not failed, f"{where}: error event {event.data[:300]}"
    else:
        response.json()


def post(client: httpx.Client, path: str, body: Any, *, anthropic: bool = False) -> None:
    try:
        content = json.dumps(body).encode()
    except (ValueError, OverflowError):  # a surrogate, say: send it as it would come
        content = repr(body).encode("utf-8", "surrogatepass")
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    check_answer(response, anthropic=anthropic)


def fuzz(
    client: httpx.Client,
    path: str,
    bodies: st.SearchStrategy[Any],
    *,
    examples: int = EXAMPLES,
    **kw: Any,
) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(body=bodies)
    def route(body: Any) -> None:
        post(client, path, body, **kw)

    route()


def fuzz_raw(client: httpx.Client, paths: list[str], *, anthropic: Callable[[str], bool]) -> None:
    @FUZZ
    @given(
        path=st.sampled_from(paths),
        data=st.binary(max_size=64)
        | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
        | st.integers(1, 3000).map(lambda n: b'{"model": "tiny", "messages": ' + b"[" * n),
    )
    def raw(path: str, data: bytes) -> None:
        response = client.post(path, content=data)
        check_answer(response, anthropic=anthropic(path))

    raw()


def alive(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200


# -- the servers ------------------------------------------------------------------------


def bad_files(directory: Path, tiny: Path) -> dict[str, str]:
    corrupt = directory / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(64))
    foreign = directory / "weights.zip"
    foreign.write_bytes(b"PK\x03\x04" + bytes(64))
    return {
        "tiny": str(tiny),
        "corrupt": str(corrupt),
        "foreign": str(foreign),
        "missing": str(directory / "missing.gguf"),
    }


@pytest.fixture
async def servers(tiny_model_path: Path):
    options = {"n_threads": 1, "n_ctx": 256}
    async with running_neuron([(MODEL, str(tiny_model_path))], options=options) as neuron:
        config = GatewayConfig(
            gateway=GatewaySection(
                listen="127.0.0.1:0",
                metrics_listen="127.0.0.1:0",
                poll_interval=5.0,
                grace_period=1.0,
                load_timeout=20.0,
            ),
            neurons=[NeuronEndpoint("local", neuron.url)],
        )
        models = ModelsFile(models=[CatalogModel(id=MODEL, vram_mb=10, options=options)])
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(partial(run_gateway, config, models, shutdown=shutdown))
            await gateway.state.wait_polled()
            try:
                yield gateway.api_url, neuron.url
            finally:
                shutdown.set()


async def test_gateway_routes_never_answer_5xx(servers: tuple[str, str]) -> None:
    gateway_url, _ = servers

    def run() -> None:
        with httpx.Client(base_url=gateway_url, timeout=ANSWER_TIMEOUT) as client:
            fuzz(client, "/v1/chat/completions", CHAT)
            fuzz(client, "/v1/completions", COMPLETION)
            fuzz(client, "/v1/responses", RESPONSES)
            fuzz(client, "/v1/messages", MESSAGES, anthropic=True)
            fuzz(client, "/v1/messages/count_tokens", COUNT, anthropic=True)
            fuzz(client, "/admin/reload", JSON)
            fuzz_raw(
                client,
                ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"],
                anthropic=lambda path: path.startswith("/v1/messages"),
            )
            for path in ("/v1/models", f"/v1/models/{MODEL}", "/fleet", "/v1/models/x/y"):
                check_answer(client.get(path), anthropic=False)
            alive(client)

    with trio.fail_after(240):
        await trio.to_thread.run_sync(run)


async def test_neuron_routes_never_answer_5xx(
    servers: tuple[str, str], tmp_path: Path, tiny_model_path: Path
) -> None:
    _, neuron_url = servers
    files = bad_files(tmp_path, tiny_model_path)
    fleet_fields = {
        **FIELDS,
        "model_id": Field(st.text(min_size=1, max_size=6).map("fuzz-{}".format), st.just("")),
        "source": Field(
            st.sampled_from(sorted(files.values())), TEXT.filter(lambda s: s != sources.DEMO)
        ),
        "path": Field(st.sampled_from(sorted(files.values()))),
        "harness": Field(st.sampled_from([None, "llamacpp", "ctransformers"])),
        "chat_format": Field(st.sampled_from([None, "chatml"]), TEXT),
        "devices": Field(st.just([])),
        "options": Field(
            st.fixed_dictionaries({"n_threads": st.just(1), "n_ctx": st.sampled_from([128, 256])}),
            st.dictionaries(TEXT, JSON, min_size=1, max_size=2)
            | st.just({"n_ctx": "x"})
            | st.just({"parallel": 10**6}),
        ),
        "cancel": BOOL,
        "text": Field(TEXT),
    }
    loads = request({"model_id", "source"}, shape_keys(LoadRequest), fleet_fields)
    unloads = request({"model_id"}, {"model_id", "cancel"}, fleet_fields)
    tokenize = request(
        {"model"}, {"model", "text", "messages", "tools", "continue_final_message"}, fleet_fields
    )

    def run() -> None:
        with httpx.Client(base_url=neuron_url, timeout=ANSWER_TIMEOUT) as client:
            fuzz(client, "/v1/chat/completions", CHAT)
            fuzz(client, "/v1/completions", COMPLETION)
            fuzz(client, "/v1/responses", RESPONSES)
            fuzz(client, "/tokenize", tokenize)
            fuzz(client, "/models/load", loads, examples=3 * EXAMPLES)
            fuzz(client, "/models/unload", unloads)
            fuzz_raw(
                client,
                ["/v1/chat/completions", "/models/load", "/tokenize"],
                anthropic=lambda path: False,
            )
            for path in ("/discovery", "/models", "/v1/models", "/metrics", "/models/x/endpoint"):
                response = client.get(path)
                assert response.status_code < 500, path
            alive(client)

    with trio.fail_after(240):
        await trio.to_thread.run_sync(run)
