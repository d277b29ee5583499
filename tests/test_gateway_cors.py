"""Browser clients: CORS preflights and headers under ``[gateway] cors_origins``."""

from __future__ import annotations

import pytest
import trio

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
CHAT = {"model": "org/small", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "org/small", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
PAGE = "http://localhost:3000"
KEY = {"authorization": "Bearer k1"}

#: What openai-node (dangerouslyAllowBrowser) and the Anthropic SDK (direct
#: browser access) ask in their preflights.
OPENAI_ASKS = "authorization,content-type"
ANTHROPIC_ASKS = (
    "anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key"
)


def preflight(origin: str, method: str = "POST", asks: str = OPENAI_ASKS) -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": asks,
    }


def assert_no_cors(headers) -> None:
    assert not [name for name in headers if name.lower().startswith("access-control-")]


def assert_cors(headers, origin: str = PAGE) -> None:
    assert headers["access-control-allow-origin"] == origin
    assert "origin" in headers["vary"].lower()
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "request-id", "retry-after"} <= exposed


@pytest.mark.parametrize(
    ("path", "asks", "methods"),
    [
        ("/v1/chat/completions", OPENAI_ASKS, {"POST"}),
        ("/v1/messages", ANTHROPIC_ASKS, {"POST"}),
        ("/v1/models", ANTHROPIC_ASKS, {"GET"}),
    ],
)
async def test_a_preflight_from_an_allowed_origin_needs_no_key(
    path: str, asks: str, methods: set[str]
) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet(
            [a], MODELS, api_keys=["k1"], cors_origins=[PAGE, "https://other.example"]
        ) as fleet:
            method = next(iter(methods))
            response = await fleet.client.options(path, headers=preflight(PAGE, method, asks))
            assert response.status_code == 204, response.text
            headers = response.headers
            assert headers["access-control-allow-origin"] == PAGE
            assert headers["vary"] == "Origin"
            allowed = {m.strip() for m in headers["access-control-allow-methods"].split(",")}
            assert methods <= allowed
            assert headers["access-control-allow-headers"] == asks
            assert int(headers["access-control-max-age"]) > 0
            assert headers["x-request-id"]
            if path == "/v1/messages":
                assert headers["request-id"] == headers["x-request-id"]
            assert a.requests == []


async def test_any_origin_with_a_star() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, cors_origins=["*"]) as fleet:
            page = "https://chat.example:8443"
            response = await fleet.client.options("/v1/chat/completions", headers=preflight(page))
            assert response.status_code == 204
            assert response.headers["access-control-allow-origin"] == page
            response = await fleet.client.post(
                "/v1/chat/completions", json=CHAT, headers={"origin": page}
            )
            assert response.status_code == 200
            assert_cors(response.headers, page)


@pytest.mark.parametrize("cors_origins", [[], ["https://other.example"]], ids=["off", "other"])
async def test_no_cors_headers_unless_the_origin_is_allowed(cors_origins: list[str]) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, cors_origins=cors_origins) as fleet:
            for path in ("/v1/chat/completions", "/v1/messages"):
                response = await fleet.client.options(path, headers=preflight(PAGE))
                # What any OPTIONS gets: the methods, and the request id.
                assert response.status_code == 200
                assert response.headers["allow"] == "OPTIONS, POST"
                assert response.headers["x-request-id"]
                if path == "/v1/messages":
                    assert response.headers["request-id"] == response.headers["x-request-id"]
                assert_no_cors(response.headers)
            response = await fleet.client.options("/v1/models", headers=preflight(PAGE, "GET"))
            assert response.status_code == 200
            assert_no_cors(response.headers)
            response = await fleet.client.post(
                "/v1/chat/completions", json=CHAT, headers={"origin": PAGE}
            )
            assert response.status_code == 200
            assert_no_cors(response.headers)


async def test_every_answer_to_an_allowed_origin_is_tagged() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    browser = {"origin": PAGE, **KEY}
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k1"], cors_origins=[PAGE]) as fleet:
            client = fleet.client
            response = await client.post("/v1/chat/completions", json=CHAT, headers=browser)
            assert response.status_code == 200, response.text
            assert_cors(response.headers)
            response = await client.post(
                "/v1/messages",
                json=MESSAGES,
                headers={"origin": PAGE, "x-api-key": "k1", "anthropic-version": "2023-06-01"},
            )
            assert response.status_code == 200, response.text
            assert_cors(response.headers)
            async with client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=browser
            ) as stream:
                assert stream.status_code == 200
                assert_cors(stream.headers)
                assert b"[DONE]" in b"".join([chunk async for chunk in stream.aiter_bytes()])
            response = await client.get("/v1/models", headers=browser)
            assert response.status_code == 200
            assert_cors(response.headers)
            # Errors, in either dialect, and a missing key: the page can read why.
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"origin": PAGE}
            )
            assert response.status_code == 401
            assert_cors(response.headers)
            response = await client.post("/v1/messages", json=MESSAGES, headers={"origin": PAGE})
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
            assert_cors(response.headers)
            response = await client.post(
                "/v1/messages", json={**MESSAGES, "model": "no/such"}, headers=browser
            )
            assert response.status_code == 404
            assert_cors(response.headers)
            response = await client.get("/v1/models", headers={"origin": PAGE})
            assert response.status_code == 401
            assert_cors(response.headers)


async def test_a_preflight_for_an_unknown_path_is_a_tagged_404() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, cors_origins=[PAGE]) as fleet:
            response = await fleet.client.options("/v2/nothing", headers=preflight(PAGE))
            assert response.status_code == 404
            assert_cors(response.headers)
