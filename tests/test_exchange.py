"""The exchange pipeline: every inference route on one path, with no web framework."""

from __future__ import annotations

import ast
import json
import pathlib
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cortex.config import CatalogModel
from cortex.gateway.dialects import ROUTES
from cortex.wire.sse import SSEDecoder
from tests.gateway_helpers import FakeNeuron, catalogue, gateway_app, running_fleet

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
PROMPT = [{"role": "user", "content": "say hello to everyone"}]
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "org/small", "messages": PROMPT},
    "/v1/completions": {"model": "org/small", "prompt": "say hello"},
    "/v1/responses": {"model": "org/small", "input": "say hello"},
    "/v1/messages": {"model": "org/small", "max_tokens": 16, "messages": PROMPT},
    "/v1/messages/count_tokens": {"model": "org/small", "messages": PROMPT},
}
PACKAGE = pathlib.Path(__file__).parent.parent / "cortex"


def _imports(path: pathlib.Path, package: str) -> set[str]:
    """The modules of ``package`` that the module at ``path`` imports (TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:
                found |= {f"{package}.{alias.name}" for alias in node.names}
            elif node.module.startswith(package + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return found


@pytest.mark.parametrize("package", ["gateway", "wire"])
def test_no_import_cycle(package: str) -> None:
    name = f"cortex.{package}"
    graph = {
        f"{name}.{path.stem}": _imports(path, name) - {f"{name}.{path.stem}"}
        for path in (PACKAGE / package).glob("*.py")
        if path.stem != "__init__"
    }
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, " -> ".join((*trail, module))
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


async def test_every_inference_route_is_served_without_the_control_app() -> None:
    a = FakeNeuron("a", preload=["org/small"])

    async def control(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"{scope['path']} reached the control app")

    with trio.fail_after(20):
        async with gateway_app([a], MODELS) as gw:
            gw.app.control = control
            assert set(BODIES) == set(ROUTES)
            for path, body in BODIES.items():
                for stream in (False, True) if path != "/v1/messages/count_tokens" else (False,):
                    answer = await gw.call(path, {**body, "stream": stream} if stream else body)
                    assert answer.status == 200, (path, stream, answer.body)
                    assert answer.headers["x-request-id"].startswith("req_")
                    anthropic = path.startswith("/v1/messages")
                    assert ("request-id" in answer.headers) == anthropic


async def test_count_tokens_is_one_exchange_like_the_others() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with gateway_app([a], MODELS) as gw:
            answer = await gw.call("/v1/messages/count_tokens", BODIES["/v1/messages/count_tokens"])
            assert json.loads(answer.body) == {"input_tokens": 4}
            registry = gw.gateway.metrics.registry
            labels = {"endpoint": "messages/count_tokens", "model": "org/small", "neuron": "a"}
            assert registry.get_sample_value("cortex_requests_total", labels) == 1
            assert gw.gateway.state.neurons["a"].in_flight.get("org/small", 0) == 0


async def test_a_streams_prompt_count_rides_the_proxys_connections() -> None:
    # The count beside an Anthropic stream goes over the hop's keep-alive
    # pool, as the request does, not over the fleet API's httpx client.
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with gateway_app([a], MODELS) as gw:
            answer = await gw.call("/v1/messages", {**BODIES["/v1/messages"], "stream": True})
            events = SSEDecoder().feed(answer.body)
            start = json.loads(events[0].data)
            assert start["message"]["usage"]["input_tokens"] == 4
            ((_, body, headers),) = [r for r in a.requests if r[0] == "/tokenize"]
            assert body == {"model": "org/small", "messages": PROMPT}
            assert headers["accept-encoding"] == "identity" and "user-agent" not in headers


@pytest.mark.parametrize("path", sorted(ROUTES))
async def test_other_methods_on_an_inference_route(path: str) -> None:
    a = FakeNeuron("a")
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.options(path)
            assert response.status_code == 200
            assert response.headers["allow"] == "OPTIONS, POST"
            response = await fleet.client.get(path)
            assert response.status_code == 405
            assert response.headers["allow"] == "OPTIONS, POST"
            if path.startswith("/v1/messages"):
                assert response.json()["type"] == "error"
            else:
                assert response.json()["error"]["type"] == "invalid_request_error"
            metrics = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
            label = ROUTES[path].endpoint
            labels = f'endpoint="{label}",model="unknown",status="405"'
            line = f"cortex_request_errors_total{{{labels}}} 1.0"
            assert line in metrics


async def test_every_error_is_among_the_requests_of_its_route() -> None:
    """Every route counts its requests (control routes with model "unknown"),
    so that errors / requests is a rate for each endpoint; a body refused
    after it parsed is labelled by the model it names."""
    a = FakeNeuron("a", preload=["org/small"])
    key = {"authorization": "Bearer k"}
    no_max_tokens = {"model": "org/small", "messages": PROMPT}
    with trio.fail_after(20):
        async with running_fleet([a], MODELS, api_keys=["k"]) as fleet:
            client = fleet.client
            assert (await client.get("/fleet")).status_code == 401
            assert (await client.get("/fleet", headers=key)).status_code == 200
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/nowhere")).status_code == 404
            assert (await client.get("/v1/chat/completions")).status_code == 405
            refused = await client.post("/v1/messages", json=no_max_tokens, headers=key)
            assert refused.status_code == 400, refused.text
            unknown = await client.post("/v1/messages", json={"model": "nope"}, headers=key)
            assert unknown.status_code == 400, unknown.text
            text = (await client.get(fleet.handle.metrics_url + "/metrics")).text
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("cortex_requests_total", "cortex_request_errors_total")
    ]

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels[k] == v for k, v in labels.items())
        )

    errors = [s for s in samples if s.name == "cortex_request_errors_total"]
    for endpoint in {s.labels["endpoint"] for s in errors}:
        requests = total("cortex_requests_total", endpoint=endpoint)
        assert total("cortex_request_errors_total", endpoint=endpoint) <= requests, endpoint
    assert total("cortex_requests_total", endpoint="fleet") == 2
    assert total("cortex_requests_total", endpoint="health") == 1
    assert total("cortex_request_errors_total", endpoint="other", status="404") == 1
    assert total("cortex_request_errors_total", endpoint="chat/completions", status="405") == 1
    assert total("cortex_request_errors_total", model="org/small", status="400") == 1
    assert total("cortex_request_errors_total", model="unknown", endpoint="messages") == 1
