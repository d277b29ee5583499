"""What an operator sees: the start line, one log line per request, warnings."""

from __future__ import annotations

import logging

import pytest
import trio

from cortex.config import CatalogModel
from tests.gateway_helpers import FakeNeuron, catalogue, running_fleet

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
