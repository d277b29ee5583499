"""Error answers in the caller's dialect: OpenAI envelopes, Anthropic envelopes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

MODELS = catalogue(
    CatalogModel(id="org/small", vram_mb=100),
    CatalogModel(id="org/pinned-out", vram_mb=900),
)

CHAT = {"model": "org/small", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "org/small", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def openai_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    return error


def anthropic_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert response.headers["request-id"]
    return body["error"]


async def test_unknown_model_is_404_in_both_dialects() -> None:
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post(
                "/v1/chat/completions", json={**CHAT, "model": "no/such"}
            )
            error = openai_error(response, 404, "invalid_request_error")
            assert error["code"] == "model_not_found" and error["param"] == "model"
            response = await fleet.client.post(
                "/v1/messages", json={**MESSAGES, "model": "no/such"}
            )
            anthropic_error(response, 404, "not_found_error")
            response = await fleet.client.post(
                "/v1/messages/count_tokens", json={"model": "no/such", "messages": []}
            )
            assert response.status_code in (400, 404)


async def test_known_but_unavailable_is_503_or_529_with_retry_after() -> None:
    # The only neuron that could hold the model is down.
    a = FakeNeuron("a", memory_mb=1000, preload=["org/small"], sizes={"org/small": 500})
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            a.shutdown.set()
            await fleet.refresh()
            response = await fleet.chat("org/small")
            openai_error(response, 503, "server_error")
            assert int(response.headers["retry-after"]) >= 1
            response = await fleet.client.post("/v1/messages", json=MESSAGES)
            anthropic_error(response, 529, "overloaded_error")
            assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}],
    ids=["none", "bad-bearer", "bad-x-api-key"],
)
async def test_api_keys_401_in_both_dialects(headers: dict[str, str]) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k1", "k2"]) as fleet:
            response = await fleet.client.post("/v1/chat/completions", json=CHAT, headers=headers)
            # OpenAI's own: the type is invalid_request_error, the code says which.
            assert openai_error(response, 401, "invalid_request_error")["code"] == "invalid_api_key"
            response = await fleet.client.post("/v1/messages", json=MESSAGES, headers=headers)
            anthropic_error(response, 401, "authentication_error")
            response = await fleet.client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert a.requests == []


async def test_api_keys_accepted_as_bearer_or_x_api_key(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# a comment\nfilekey\n")
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k1"], api_keys_file=str(keys)) as fleet:
            ok = await fleet.client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k1"}
            )
            assert ok.status_code == 200
            ok = await fleet.client.post(
                "/v1/messages", json=MESSAGES, headers={"x-api-key": "filekey"}
            )
            assert ok.status_code == 200
            assert (await fleet.client.get("/health")).status_code == 200


async def test_a_wrong_x_api_key_does_not_hide_a_valid_bearer() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    both = {"x-api-key": "wrong", "authorization": "Bearer k2"}
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k1", "k2"]) as fleet:
            ok = await fleet.client.post("/v1/chat/completions", json=CHAT, headers=both)
            assert ok.status_code == 200, ok.text
            ok = await fleet.client.post("/v1/messages", json=MESSAGES, headers=both)
            assert ok.status_code == 200, ok.text
            assert (await fleet.client.get("/v1/models", headers=both)).status_code == 200
            # A key that is not ASCII is just another wrong key (not a 500).
            odd = {"x-api-key": "k\u00e9y".encode("latin-1")}
            response = await fleet.client.post("/v1/chat/completions", json=CHAT, headers=odd)
            openai_error(response, 401, "invalid_request_error")
            response = await fleet.client.get("/v1/models", headers=odd)
            assert response.status_code == 401


async def test_health_details_need_the_key() -> None:
    # Health checkers get up/down without a key; endpoints and transport
    # errors (internal addresses) only with one.
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k1"]) as fleet:
            for headers in ({}, {"authorization": "Bearer wrong"}):
                response = await fleet.client.get("/health", headers=headers)
                assert response.status_code == 200
                assert response.json() == {
                    "status": "ok",
                    "neurons": [{"name": "a", "up": True, "draining": False}],
                }
            response = await fleet.client.get("/health", headers={"x-api-key": "k1"})
            (neuron,) = response.json()["neurons"]
            assert neuron["endpoint"] == a.url and neuron["models"] == {"org/small": "loaded"}
        b = FakeNeuron("b")
        async with running_fleet([b], MODELS) as fleet:
            (neuron,) = (await fleet.client.get("/health")).json()["neurons"]
            assert neuron["endpoint"] == b.url


async def test_body_over_the_limit_is_413_in_both_dialects() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, max_body_bytes=1000) as fleet:
            response = await fleet.client.post("/v1/chat/completions", json=big)
            openai_error(response, 413, "request_too_large")
            response = await fleet.client.post("/v1/messages", json={**MESSAGES, **big})
            anthropic_error(response, 413, "request_too_large")

            # Without a Content-Length (chunked upload) the limit holds as well.
            async def chunks():
                yield b'{"model": "org/small", "messages": "'
                yield b"x" * 5000
                yield b'"}'

            response = await fleet.client.post("/v1/chat/completions", content=chunks())
            openai_error(response, 413, "request_too_large")
            assert a.requests == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"'])
async def test_invalid_json_is_400_in_both_dialects(body: bytes) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post("/v1/chat/completions", content=body)
            openai_error(response, 400, "invalid_request_error")
            response = await fleet.client.post("/v1/messages", content=body)
            anthropic_error(response, 400, "invalid_request_error")


async def test_invalid_requests_are_400() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post("/v1/chat/completions", json={"messages": []})
            assert openai_error(response, 400, "invalid_request_error")["param"] == "model"
            no_max = {k: v for k, v in MESSAGES.items() if k != "max_tokens"}
            response = await fleet.client.post("/v1/messages", json=no_max)
            anthropic_error(response, 400, "invalid_request_error")


async def test_unknown_route_and_method_in_the_envelope() -> None:
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.get("/v1/nothing")
            openai_error(response, 404, "invalid_request_error")
            response = await fleet.client.get("/v1/chat/completions")
            openai_error(response, 405, "invalid_request_error")
            response = await fleet.client.get("/v1/messages")
            assert response.status_code == 405
            assert response.json()["type"] == "error"
