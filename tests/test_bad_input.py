"""Bad input on every route of both roles: a 4xx in the caller's envelope, always counted."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cortex.config import CatalogModel
from cortex.errors import InvalidRequest
from cortex.gateway.router import Router
from cortex.testing import FakeEngine
from cortex.wire import jsonbody
from tests.gateway_helpers import FakeNeuron, catalogue, gateway_app, running_fleet
from tests.neuron_helpers import running_neuron

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_IN_OBJECT = b'{"model": "org/small", "messages": ' + DEEP + b"}"

GATEWAY_POSTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]
NEURON_POSTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/models/load",
    "/models/unload",
    "/tokenize",
]


def error_of(response: httpx.Response, path: str) -> dict[str, Any]:
    """The error object of an answer, checked against the route's dialect."""
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def errors_counted(registry: Any, endpoint: str, status: int) -> float:
    value = registry.get_sample_value(
        "cortex_request_errors_total",
        {"endpoint": endpoint, "model": "unknown", "status": str(status)},
    )
    return value or 0.0


async def scraped_errors(fleet: Any) -> dict[tuple[str, int], float]:
    """cortex_request_errors_total from the gateway's metrics port, by (endpoint, status)."""
    text = (await fleet.client.get(fleet.handle.metrics_url + "/metrics")).text
    found: dict[tuple[str, int], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cortex_request_errors_total":
                key = (sample.labels["endpoint"], int(sample.labels["status"]))
                found[key] = found.get(key, 0.0) + sample.value
    return found


# -- the parser -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [DEEP, DEEP_IN_OBJECT, b"[" * 101 + b"]" * 101, b"NaN", b'{"a": Infinity}', b"\xff\xfe{"],
)
def test_parser_refuses_what_is_no_request(data: bytes) -> None:
    with pytest.raises(InvalidRequest):
        jsonbody.loads(data)


def test_parser_takes_what_nests_within_the_limit() -> None:
    nested = b"[" * 100 + b"]" * 100
    assert jsonbody.loads(nested) is not None
    wide = b"[" + b",".join([b"[]"] * 5000) + b"]"
    assert len(jsonbody.loads(wide)) == 5000
    with pytest.raises(InvalidRequest):
        jsonbody.loads_object(b"[]")


LONE_SURROGATE = {
    "/v1/chat/completions": b'{"model": "org/small", '
    b'"messages": [{"role": "user", "content": "a\\ud800"}]}',
    "/v1/completions": b'{"model": "org/small", "prompt": "\\udfff"}',
    "/v1/responses": b'{"model": "org/small", "input": [{"role": "user", "content": "\\ud83d"}]}',
    "/v1/messages": b'{"model": "org/small", "max_tokens": 5, '
    b'"messages": [{"role": "user", "content": "\\ud800"}]}',
    "/v1/messages/count_tokens": b'{"model": "org/small", '
    b'"messages": [{"role": "user", "content": "\\ud800"}]}',
}
SURROGATE_AT = {
    "/v1/chat/completions": "messages[0].content",
    "/v1/completions": "prompt",
    "/v1/responses": "input[0].content",
    "/v1/messages": "messages.0.content",
    "/v1/messages/count_tokens": "messages.0.content",
}


def test_parser_refuses_a_lone_surrogate_naming_its_place() -> None:
    with pytest.raises(InvalidRequest) as caught:
        jsonbody.loads(LONE_SURROGATE["/v1/chat/completions"])
    assert caught.value.param == "messages[0].content"
    assert "lone UTF-16 surrogate" in caught.value.message
    with pytest.raises(InvalidRequest):
        jsonbody.loads(b'{"tools": [{"na\\udc00me": 1}]}')


def test_parser_takes_surrogate_pairs_and_escaped_backslashes() -> None:
    assert jsonbody.loads(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    assert jsonbody.loads(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}


# -- the gateway ------------------------------------------------------------------------


@pytest.mark.parametrize("path", GATEWAY_POSTS)
async def test_a_lone_surrogate_is_400_naming_the_field_on_every_gateway_route(path: str) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post(path, content=LONE_SURROGATE[path])
            assert response.status_code == 400, response.text
            error = error_of(response, path)
            assert error["type"] == "invalid_request_error"
            assert f"{SURROGATE_AT[path]} holds a lone UTF-16 surrogate" in error["message"]
            if not path.startswith("/v1/messages"):
                assert error["param"] == SURROGATE_AT[path]
            assert a.requests == []


@pytest.mark.parametrize("path", GATEWAY_POSTS)
async def test_deep_json_is_400_in_the_dialect_on_every_gateway_route(path: str) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            for data in (DEEP, DEEP_IN_OBJECT):
                response = await fleet.client.post(path, content=data)
                assert response.status_code == 400, response.text
                assert "nested deeper" in error_of(response, path)["message"]
            assert a.requests == []


async def test_every_error_answer_is_counted() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            await fleet.client.post("/v1/chat/completions", content=DEEP)
            await fleet.client.post("/v1/messages", content=DEEP)
            await fleet.client.post("/v1/messages/count_tokens", content=DEEP)
            await fleet.client.get("/v1/nothing")
            await fleet.client.get("/v1/chat/completions")
            await fleet.client.get("/v1/models/no/such")
            assert (await fleet.client.get("/health")).status_code == 200
            assert await scraped_errors(fleet) == {
                ("chat/completions", 400): 1,
                ("messages", 400): 1,
                ("messages/count_tokens", 400): 1,
                ("other", 404): 1,
                ("chat/completions", 405): 1,
                ("models", 404): 1,
            }


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_bug_answers_500_and_is_counted_as_one(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = FakeNeuron("a", preload=["org/small"])

    def broken(self: Router, name: str) -> str:
        raise RuntimeError("a bug")

    with trio.fail_after(20):
        async with gateway_app([a], MODELS) as gw:
            monkeypatch.setattr(Router, "resolve", broken)
            body = {"model": "org/small", "max_tokens": 8, "messages": [{"role": "user"}]}
            body["messages"][0]["content"] = "hi"
            answer = await gw.call(path, body)
            assert answer.status == 500
            registry = gw.gateway.metrics.registry
            endpoint = path.removeprefix("/v1/")
            assert errors_counted(registry, endpoint, 500) == 1
            assert errors_counted(registry, endpoint, 499) == 0


# -- the neuron -------------------------------------------------------------------------


async def test_deep_json_is_400_on_every_neuron_route(tiny_model_path: Path) -> None:
    with trio.fail_after(30):
        async with running_neuron([("tiny", str(tiny_model_path))]) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=20) as http:
                for path in NEURON_POSTS:
                    for data in (DEEP, b'{"model": "tiny", "messages": ' + DEEP + b"}"):
                        response = await http.post(path, content=data)
                        assert response.status_code == 400, (path, response.text)
                        assert "nested deeper" in error_of(response, path)["message"]
                assert (await http.get("/health")).status_code == 200


async def test_a_lone_surrogate_is_400_naming_the_field_on_the_neuron(
    tiny_model_path: Path,
) -> None:
    with trio.fail_after(30):
        async with running_neuron([("tiny", str(tiny_model_path))]) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=20) as http:
                for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
                    data = LONE_SURROGATE[path].replace(b"org/small", b"tiny")
                    response = await http.post(path, content=data)
                    assert response.status_code == 400, (path, response.text)
                    assert error_of(response, path)["param"] == SURROGATE_AT[path]
                data = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
                response = await http.post("/tokenize", content=data)
                assert response.status_code == 400, response.text


# -- answers given without reading the body ---------------------------------------------


def refused_in_a_row(url: str, path: str, headers: dict[str, str], times: int = 40) -> list[int]:
    """POST ``times`` bodies on one keep-alive connection; the statuses (a hang raises)."""
    statuses = []
    with httpx.Client(base_url=url, timeout=5) as client:
        for n in range(times):
            body = b'{"model": "m", "filler": "' + b"x" * (n * 37) + b'"}'
            statuses.append(client.post(path, content=body, headers=headers).status_code)
    return statuses


async def test_refusals_before_reading_the_body_never_hang_the_connection() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(60):
        async with running_fleet([a], MODELS) as open_fleet:
            statuses = await trio.to_thread.run_sync(
                refused_in_a_row, open_fleet.url, "/admin/reload", {}
            )
            assert set(statuses) == {403}
        async with running_fleet([a], MODELS, api_keys=["k"]) as fleet:
            for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"):
                statuses = await trio.to_thread.run_sync(refused_in_a_row, fleet.url, path, {})
                assert set(statuses) == {401}, path


async def test_a_neuron_refusing_a_token_never_hangs_the_connection(
    tiny_model_path: Path,
) -> None:
    with trio.fail_after(60):
        async with running_neuron([("tiny", str(tiny_model_path))], token="s3cret") as neuron:
            for path in ("/tokenize", "/v1/chat/completions", "/models/load"):
                statuses = await trio.to_thread.run_sync(refused_in_a_row, neuron.url, path, {})
                assert set(statuses) == {401}, path


async def test_an_assistant_turn_with_null_content_is_an_empty_turn(
    tiny_model_path: Path,
) -> None:
    # The template must see "", not None: printed as "None", or a TypeError in a template.
    def conversation(content: str | None) -> dict[str, Any]:
        return {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": "again"},
            ],
        }

    with trio.fail_after(30):
        async with running_neuron([("tiny", str(tiny_model_path))]) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=20) as http:
                empty = await http.post("/tokenize", json=conversation(""))
                null = await http.post("/tokenize", json=conversation(None))
                answer = await http.post(
                    "/v1/chat/completions", json={**conversation(None), "max_tokens": 2}
                )
    assert null.status_code == 200, null.text
    assert null.json()["count"] == empty.json()["count"]
    assert answer.status_code == 200, answer.text


async def test_errors_quote_the_clients_values_as_json_not_python(tiny_model_path: Path) -> None:
    hi = {"role": "user", "content": "hi"}
    refusals = [
        ({"messages": [{"content": "hi"}]}, "got null"),
        ({"messages": [{"role": True, "content": "hi"}]}, "got true"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "got 'bot'"),
        ({"messages": [hi], "modalities": ["audio"]}, 'modalities ["audio"] are not'),
        ({"messages": [hi], "logit_bias": {"5": None}}, "got null for token 5"),
    ]
    with trio.fail_after(30):
        async with (
            running_neuron([("tiny", str(tiny_model_path))]) as neuron,
            httpx.AsyncClient(base_url=neuron.url, timeout=20) as http,
        ):
            for body, quoted in refusals:
                response = await http.post("/v1/chat/completions", json={"model": "tiny", **body})
                assert response.status_code == 400, response.text
                message = error_of(response, "/v1/chat/completions")["message"]
                assert quoted in message and "None" not in message and "True" not in message
        async with running_fleet([FakeNeuron("a", preload=["org/small"])], MODELS) as fleet:
            body = {"model": "org/small", "max_tokens": 8, "messages": [{"content": "hi"}]}
            response = await fleet.client.post("/v1/messages", json=body)
    assert response.status_code == 400
    assert error_of(response, "/v1/messages")["message"].endswith("got null")


async def test_no_route_says_which_request_in_the_dialect() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            missing = await fleet.client.post("/v1/embeddings", json={})
            chat_get = await fleet.client.get("/v1/chat/completions")
            messages_get = await fleet.client.get("/v1/messages")
            models_post = await fleet.client.post("/v1/models", json={})
    assert missing.status_code == 404
    assert error_of(missing, "/v1/embeddings")["message"] == "no route POST /v1/embeddings"
    assert chat_get.status_code == 405
    error = error_of(chat_get, "/v1/chat/completions")
    assert error["message"] == "GET is not allowed on /v1/chat/completions (allowed: POST)"
    assert error["type"] == "invalid_request_error"
    assert messages_get.status_code == 405
    assert error_of(messages_get, "/v1/messages") == {
        "type": "invalid_request_error",
        "message": "GET is not allowed on /v1/messages (allowed: POST)",
    }
    assert models_post.status_code == 405
    assert error_of(models_post, "/v1/models")["message"].startswith(
        "POST is not allowed on /v1/models (allowed: GET"
    )


async def test_no_route_on_the_neuron_says_which_request(tiny_model_path: Path) -> None:
    with trio.fail_after(30):
        async with running_neuron([("tiny", str(tiny_model_path))]) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=20) as http:
                missing = await http.post("/v1/embeddings", json={})
                wrong = await http.get("/v1/completions")
    assert error_of(missing, "/v1/embeddings")["message"] == "no route POST /v1/embeddings"
    assert error_of(wrong, "/v1/completions")["message"] == (
        "GET is not allowed on /v1/completions (allowed: POST)"
    )


# -- compressed bodies ------------------------------------------------------------------


def compressed(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    return zlib.compress(data)  # HTTP's deflate: zlib's format


#: 10 MB of spaces in a JSON string: 10 KB compressed, over the 1 MB limit once decoded.
BOMB = gzip.compress(b'{"model": "org/small", "prompt": "' + b" " * 10_000_000 + b'"}')


@pytest.mark.parametrize("path", GATEWAY_POSTS)
async def test_compressed_bodies_are_decoded_on_every_gateway_route(path: str) -> None:
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(20):
        async with running_fleet([a], MODELS, max_body_bytes=1_000_000) as fleet:
            # Decoded, then parsed as any body: the same 400 naming the field.
            for encoding in ("gzip", "deflate", "identity, gzip"):
                response = await fleet.client.post(
                    path,
                    content=compressed(LONE_SURROGATE[path], encoding.split(", ")[-1]),
                    headers={"content-encoding": encoding},
                )
                assert response.status_code == 400, (encoding, response.text)
                assert "lone UTF-16 surrogate" in error_of(response, path)["message"]
            for encoding in ("zstd", "br"):
                response = await fleet.client.post(
                    path, content=b"\x28\xb5\x2f\xfd", headers={"content-encoding": encoding}
                )
                assert response.status_code == 415, response.text
                error = error_of(response, path)
                assert f"Content-Encoding '{encoding}' is not supported" in error["message"]
                assert "gzip or deflate" in error["message"]
                if path.startswith("/v1/messages"):
                    assert error["type"] == "invalid_request_error"
            response = await fleet.client.post(
                path, content=BOMB, headers={"content-encoding": "gzip"}
            )
            assert response.status_code == 413, response.text
            assert "limit once decoded" in error_of(response, path)["message"]
            broken = await fleet.client.post(
                path, content=BOMB[:100], headers={"content-encoding": "gzip"}
            )
            assert broken.status_code == 400
            assert "not valid gzip data" in error_of(broken, path)["message"]
            assert a.requests == []


async def test_a_compressed_request_reaches_the_neuron_decoded() -> None:
    a = FakeNeuron("a", preload=["org/small"])
    body = {"model": "org/small", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(20):
        async with running_fleet([a], MODELS) as fleet:
            response = await fleet.client.post(
                "/v1/chat/completions",
                content=gzip.compress(json.dumps(body).encode()),
                headers={"content-encoding": "gzip", "content-type": "application/json"},
            )
            assert response.status_code == 200, response.text
    [(path, sent, headers)] = a.requests
    assert path == "/v1/chat/completions" and sent["messages"] == body["messages"]
    assert "content-encoding" not in headers


async def test_compressed_bodies_are_decoded_on_every_neuron_route(tmp_path: Path) -> None:
    source = tmp_path / "m.fake"
    source.write_text("fake")
    with trio.fail_after(30):
        async with running_neuron(
            [("m", str(source))],
            plugins=[FakeEngine(reply=lambda prompt: "Hi")],
            max_body_bytes=1_000_000,
        ) as neuron:
            async with httpx.AsyncClient(base_url=neuron.url, timeout=20) as http:
                for path in NEURON_POSTS:
                    for encoding in ("gzip", "deflate"):
                        response = await http.post(
                            path,
                            content=compressed(DEEP_IN_OBJECT, encoding),
                            headers={"content-encoding": encoding},
                        )
                        assert response.status_code == 400, (path, response.text)
                        assert "nested deeper" in error_of(response, path)["message"]
                    response = await http.post(
                        path, content=b"{}", headers={"content-encoding": "br"}
                    )
                    assert response.status_code == 415, (path, response.text)
                    assert "'br' is not supported" in error_of(response, path)["message"]
                    response = await http.post(
                        path, content=BOMB, headers={"content-encoding": "gzip"}
                    )
                    assert response.status_code == 413, (path, response.text)
                chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                response = await http.post(
                    "/v1/chat/completions",
                    content=zlib.compress(json.dumps(chat).encode()),
                    headers={"content-encoding": "deflate"},
                )
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["message"]["content"] == "Hi"
