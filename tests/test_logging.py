"""What the log says: why a request was refused, and no HTTP client chatter at debug."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def wait_for(log: Path, text: str, process: subprocess.Popen[bytes]) -> str:
    """The log once ``text`` is in it."""
    deadline = time.monotonic() + 60
    while text not in (said := log.read_text()):
        assert process.poll() is None, said
        assert time.monotonic() < deadline, said
        time.sleep(0.05)
    return said


@pytest.mark.parametrize("level", ["debug", "trace"])
def test_errors_are_logged_with_their_reason_and_debug_has_no_http_client_traces(
    tmp_path: Path, level: str
) -> None:
    """Both roles (a standalone runs each) log why they answered a request
    with an error; ``debug`` leaves out httpx / httpcore, ``trace`` keeps them."""
    log = tmp_path / "stderr"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "cortex", "--role", "standalone"),
                *("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
                *("--log-level", level),
            ],
            stderr=stderr,
        )
    try:
        said = wait_for(log, "is up", process)
        urls = [line.rsplit(" ", 1)[-1] for line in said.splitlines() if "listening on" in line]
        neuron_url, gateway_url = urls[0], urls[1]
        bad = {"model": "m", "messages": "hello"}
        for url in (neuron_url, gateway_url):
            answer = httpx.post(f"{url}/v1/chat/completions", json=bad, timeout=30)
            assert answer.status_code in (400, 404), answer.text
        answer = httpx.post(f"{gateway_url}/v1/chat/completions", content=b"{", timeout=30)
        assert answer.status_code == 400
        assert httpx.get(f"{gateway_url}/v1/models/nope", timeout=30).status_code == 404
        wait_for(log, "error=invalid_request_error: request body is not valid JSON", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
    lines = log.read_text().splitlines()
    # Each role's one line per request says why.
    [neuron_line] = [line for line in lines if "POST /v1/chat/completions 4" in line]
    assert "error=" in neuron_line and "messages" in neuron_line, neuron_line
    [refused] = [line for line in lines if "not valid JSON" in line]
    assert " cortex.gateway.proxy: chat/completions 400 model=unknown " in refused, refused
    # The control app's errors too, on the one line the pipeline writes for them.
    [missing] = [line for line in lines if "GET /v1/models/nope" in line]
    assert " 404 request_id=" in missing and "error=model_not_found: " in missing, missing
    clients = [line for line in lines if " httpx: " in line or " httpcore." in line]
    assert bool(clients) == (level == "trace"), clients[:3]
