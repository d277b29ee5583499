"""Live catalogue reload: SIGHUP re-reads models.toml; a bad file keeps the old one."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from cortex.config import (
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
    load_models,
)
from cortex.gateway.app import run_gateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_ids(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sighup_reloads_the_catalogue(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "first"\nsource = "a.gguf"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cortex",
            "--role",
            "gateway",
            "--models",
            str(models),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "127.0.0.1:0",
            "--neuron",
            "nowhere=http://127.0.0.1:9",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up() -> bool:
            try:
                return "first" in model_ids(url)
            except httpx.TransportError:
                return False

        wait_for(up, "the gateway")
        models.write_text(
            '[[models]]\nid = "first"\n[[models]]\nid = "second"\n[aliases]\n"tier/x" = "second"\n'
        )
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: {"second", "tier/x"} <= model_ids(url), "the reloaded catalogue")

        models.write_text("[[models]]\nid = 3\n")
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
        assert "reload failed, keeping the old catalogue" in log
        assert str(models) in log
    finally:
        process.kill()
        process.wait()


async def test_admin_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cortex.gateway.reload")

    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "first"\n')
    config = GatewayConfig(
        gateway=GatewaySection(
            listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", api_keys=["k"], grace_period=1
        ),
        neurons=[NeuronEndpoint(name="nowhere", endpoint="http://127.0.0.1:9")],
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            partial(
                run_gateway,
                config,
                load_models(models),
                shutdown=shutdown,
                models_path=str(models),
            )
        )
        auth = {"authorization": "Bearer k"}
        async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
            with trio.fail_after(30):
                assert (await http.post("/admin/reload")).status_code == 401
                models.write_text('[[models]]\nid = "first"\n[[models]]\nid = "second"\n')
                done = await http.post("/admin/reload", headers=auth)
                assert done.json() == {"status": "reloaded", "models": 2, "aliases": 0, "tiers": 0}
                models.write_text(
                    '[[models]]\nid = "first"\n[[models]]\nid = "second"\n[aliases]\n'
                    'a = "first"\nb = "first"\nc = "second"\n"tier/x" = ["first", "second"]\n'
                )
                with_tier = await http.post("/admin/reload", headers=auth)
                assert with_tier.json() == {
                    "status": "reloaded",
                    "models": 2,
                    "aliases": 3,
                    "tiers": 1,
                }
                assert f"reloaded {models}: 2 models, 3 aliases, 1 tier" in caplog.messages
                models.write_text('[[models]]\nid = "first"\n[[models]]\nid = "second"\n')
                await http.post("/admin/reload", headers=auth)
                listed = (await http.get("/v1/models", headers=auth)).json()["data"]
                assert {m["id"] for m in listed} == {"first", "second"}
                models.write_text("[[models]]\nid = 3\n")
                bad = await http.post("/admin/reload", headers=auth)
                # The request was fine; the server's file is not.
                assert bad.status_code == 500
                error = bad.json()["error"]
                assert error["type"] == "server_error" and error["code"] == "invalid_catalogue"
                assert "kept the old catalogue" in error["message"]
                listed = (await http.get("/v1/models", headers=auth)).json()["data"]
                assert {m["id"] for m in listed} == {"first", "second"}
                # A file cut short while written drops nothing.
                for blank in ("", "  \n\t\n"):
                    models.write_text(blank)
                    empty = await http.post("/admin/reload", headers=auth)
                    assert empty.status_code == 500, empty.text
                    assert "the file is empty" in empty.json()["error"]["message"]
                    listed = (await http.get("/v1/models", headers=auth)).json()["data"]
                    assert {m["id"] for m in listed} == {"first", "second"}
                # Content and no [[models]]: an empty catalogue, meant.
                models.write_text("# nothing served for now\n")
                none = await http.post("/admin/reload", headers=auth)
                assert none.json()["models"] == 0, none.text
                models.write_text('[[models]]\nid = "first"\n[[models]]\nid = "second"\n')
                assert (await http.post("/admin/reload", headers=auth)).status_code == 200
                # A pin on a neuron this gateway does not have is a typo, not a new neuron.
                models.write_text('[[models]]\nid = "first"\npinned_on = ["nowhre"]\n')
                typo = await http.post("/admin/reload", headers=auth)
                assert typo.status_code == 500
                assert "'nowhre', which is not a neuron" in typo.json()["error"]["message"]
                models.write_text('[[models]]\nid = "first"\npinned_on = ["nowhere"]\n')
                assert (await http.post("/admin/reload", headers=auth)).status_code == 200
        shutdown.set()


async def test_admin_reload_needs_keys(tmp_path: Path) -> None:

    config = GatewayConfig(
        gateway=GatewaySection(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1),
        neurons=[NeuronEndpoint(name="nowhere", endpoint="http://127.0.0.1:9")],
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(run_gateway, config, ModelsFile(), shutdown=shutdown))
        async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
            with trio.fail_after(30):
                refused = await http.post("/admin/reload")
        assert refused.status_code == 403
        assert refused.json()["error"]["type"] == "permission_error"
        shutdown.set()


async def test_a_reload_re_reads_the_api_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key\n")
    config = GatewayConfig(
        gateway=GatewaySection(
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            api_keys_file=str(keys),
            grace_period=1,
        ),
        neurons=[NeuronEndpoint(name="nowhere", endpoint="http://127.0.0.1:9")],
    )

    def key(value: str) -> dict[str, str]:
        return {"authorization": f"Bearer {value}"}

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        # No --models: the keys file alone is there to re-read.
        handle = await nursery.start(partial(run_gateway, config, ModelsFile(), shutdown=shutdown))
        async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
            with trio.fail_after(30):
                keys.write_text("new-key\n# a comment\n")
                done = await http.post("/admin/reload", headers=key("old-key"))
                assert done.status_code == 200, done.text
                assert (await http.get("/v1/models", headers=key("old-key"))).status_code == 401
                assert (await http.get("/v1/models", headers=key("new-key"))).status_code == 200
                # A file cut short would open the gateway: the old keys stay.
                keys.write_text("")
                kept = await http.post("/admin/reload", headers=key("new-key"))
                assert kept.status_code == 500, kept.text
                assert "no API key in it" in kept.json()["error"]["message"]
                assert (await http.get("/v1/models", headers=key("new-key"))).status_code == 200
                # SIGHUP's way (cortex.cli calls the handle's reload).
                keys.write_text("third-key\n")
                await handle.reload()
                assert (await http.get("/v1/models", headers=key("new-key"))).status_code == 401
                assert (await http.get("/v1/models", headers=key("third-key"))).status_code == 200
        shutdown.set()
