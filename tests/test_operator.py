"""What an operator sees: the start line, one log line per request, warnings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, gateway_app, running_fleet

MODELS = catalogue(CatalogModel(id="org/small", vram_mb=100))


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_the_start_line_names_the_address_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, listen="0.0.0.0:0") as fleet:
            port = fleet.url.rsplit(":", 1)[1]
    info = messages(caplog, logging.INFO)
    assert any(m.startswith(f"gateway on http://0.0.0.0:{port} ") for m in info), info
    assert f"listening on http://0.0.0.0:{port}" in info
    (warning,) = [m for m in messages(caplog, logging.WARNING) if "API keys" in m]
    assert "0.0.0.0:0" in warning


@pytest.mark.parametrize(
    ("listen", "keys"), [("127.0.0.1:0", []), ("0.0.0.0:0", ["k1"])], ids=["loopback", "keys"]
)
async def test_no_warning_on_loopback_or_with_keys(
    listen: str, keys: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    a = FakeNeuron("a")
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, listen=listen, api_keys=keys):
            pass
    assert not [m for m in messages(caplog, logging.WARNING) if "API keys" in m]


async def test_one_info_line_per_request_with_its_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a = FakeNeuron("a", preload=["org/small"])
    with trio.fail_after(10):
        async with running_fleet([a], MODELS) as fleet:
            for n, (path, body) in enumerate(
                [
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                    (
                        "/v1/messages",
                        {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
                    ),
                    (
                        "/v1/messages/count_tokens",
                        {"messages": [{"role": "user", "content": "hi"}]},
                    ),
                    ("/v1/chat/completions", {"model": 5}),
                ]
            ):
                body.setdefault("model", "org/small")
                await fleet.client.post(path, json=body, headers={"x-request-id": f"req-op-{n}"})
    gateway_lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.name.startswith("cortex.gateway")
    ]
    for n in range(4):
        lines = [m for m in gateway_lines if f"request_id=req-op-{n}" in m]
        assert len(lines) == 1, (n, gateway_lines)
    assert " 200 " in next(m for m in gateway_lines if "req-op-0" in m)
    assert " 400 " in next(m for m in gateway_lines if "req-op-3" in m)


async def test_every_answer_carries_a_request_id(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The control routes' answers too (not only their errors): the client's id, or a new one."""
    caplog.set_level(logging.DEBUG, logger="cortex.gateway.exchange")
    a = FakeNeuron("a", preload=["org/small"])
    mine = {"x-request-id": "mine-123", "authorization": "Bearer k"}
    paths = ["/", "/health", "/fleet", "/v1/models", "/v1/models/org/small"]
    with trio.fail_after(10):
        async with running_fleet([a], MODELS, api_keys=["k"]) as fleet:
            answers = [await fleet.client.get(path, headers=mine) for path in paths]
            fresh = await fleet.client.get("/health")
        models = tmp_path / "models.toml"
        models.write_text('[[models]]\nid = "org/small"\n')
        async with gateway_app([FakeNeuron("b")], MODELS, api_keys=["k"]) as gw:
            gw.gateway.models_path = str(models)
            reloaded = await gw.call("/admin/reload", {}, headers=mine)
    for path, answer in zip(paths, answers, strict=True):
        assert answer.status_code == 200, path
        assert answer.headers["x-request-id"] == "mine-123", path
    assert fresh.headers["x-request-id"].startswith("req_")
    assert reloaded.status == 200 and reloaded.headers["x-request-id"] == "mine-123"
    logged = [r.getMessage() for r in caplog.records if "request_id=mine-123" in r.getMessage()]
    assert len(logged) == len(paths) + 1, logged
    assert any(
        m.startswith(f"GET /health 200 request_id={fresh.headers['x-request-id']}")
        for m in messages(caplog, logging.DEBUG)
    )
