"""Claude Code itself against a gateway and a neuron with the scripted engine.

Runs only where the ``claude`` CLI is installed (``npm install -g
@anthropic-ai/claude-code``; ``.ci/run`` installs it where npm can). It
runs offline: the environment points every model tier at the gateway and
turns telemetry and other traffic off, and ``HOME`` is a temporary
directory. The manual version, with a capture of what Claude Code sends,
is ``contrib/claude-code/README.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import pytest
import trio

from cortex.config import CatalogModel, ModelsFile
from cortex.neuron.models import LoadRequest
from tests.neuron_helpers import running_neuron
from tests.scripted_helpers import (
    engine_model,
    install_scripted_engine,
    running_gateway,
    write_script,
)

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(
    CLAUDE is None, reason="the claude CLI is not installed (npm i -g @anthropic-ai/claude-code)"
)

BASH_CALL = (
    '<tool_call>\n{"name": "Bash", "arguments": {"command": "echo cortex-tool-ok", '
    '"description": "Print a marker"}}\n</tool_call>'
)
SCRIPT = {
    "rules": [
        {"when": "cortex-tool-ok", "reply": "The command printed cortex-tool-ok. Done."},
        {"when": "run the check", "tools": True, "reply": "Running it.\n" + BASH_CALL},
        {"when": "hello", "reply": "Hello from the cortex fleet!"},
        {"when": "take your time", "delay": 330, "reply": "Worth the wait."},
    ],
    "default": "Scripted answer.",
}


@pytest.fixture
async def fleet(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    install_scripted_engine(tmp_path, monkeypatch)
    source = write_script(tmp_path, "claude", SCRIPT)
    # Claude Code's system prompt and 24 tools are ~120k bytes (a token a byte here).
    async with running_neuron([], options={}) as neuron:
        for model_id, n_ctx in (("scripted", 400_000), ("scripted-small", 50_000)):
            await neuron.neuron.manager.load(
                LoadRequest(model_id=model_id, source=source, options={"n_ctx": n_ctx})
            )
        models = ModelsFile(
            models=[CatalogModel(id="scripted", vram_mb=1), CatalogModel(id="scripted-small")],
            aliases={"claude-local": "scripted"},
        )
        async with running_gateway(neuron.url, models) as gateway:
            yield neuron, gateway.api_url


async def claude(
    url: str, home: pathlib.Path, *args: str, model: str = "claude-local", seconds: float = 90
) -> Any:
    """``claude -p ... --output-format json`` against ``url``: (exit status, the JSON result)."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-local",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    assert CLAUDE is not None
    with trio.fail_after(seconds):
        done = await trio.run_process(
            [CLAUDE, "-p", *args, "--output-format", "json"],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"claude printed no JSON: {done.stdout!r} {done.stderr!r}")


async def test_claude_code_answers_in_text(fleet: Any, tmp_path: pathlib.Path) -> None:
    neuron, url = fleet
    status, result = await claude(url, tmp_path, "hello")
    assert (status, result["is_error"]) == (0, False), result
    assert result["result"] == "Hello from the cortex fleet!"
    assert result["stop_reason"] == "end_turn"
    prompt = engine_model(neuron).prompts[-1]
    assert prompt.startswith("<|system|># Tools\n") and '"name": "Bash"' in prompt
    # Its first system block is client metadata, not prompt (WIRE.md).
    assert "x-anthropic-billing-header" not in prompt


async def test_claude_code_runs_a_tool_and_sends_the_result(
    fleet: Any, tmp_path: pathlib.Path
) -> None:
    neuron, url = fleet
    status, result = await claude(
        url, tmp_path, "please run the check", "--allowedTools", "Bash(echo:*)"
    )
    assert (status, result["is_error"]) == (0, False), result
    assert result["result"] == "The command printed cortex-tool-ok. Done."
    assert result["num_turns"] == 2
    # The second turn: the call as the model wrote it, then Bash's output as its result.
    prompt = engine_model(neuron).prompts[-1]
    call = prompt.index(
        '<tool_call>{"name": "Bash", "arguments": {"command": "echo cortex-tool-ok"'
    )
    result_at = prompt.index("<|tool|>call_")
    assert call < result_at
    assert prompt[result_at:].split(": ", 1)[1].startswith("cortex-tool-ok")


async def test_claude_code_recognises_a_too_long_prompt(fleet: Any, tmp_path: pathlib.Path) -> None:
    _, url = fleet
    status, result = await claude(url, tmp_path, "hello", model="scripted-small")
    assert status == 1 and result["is_error"]
    assert result["api_error_status"] == 400
    # Its own message for "prompt is too long: N tokens > M maximum", not a bare API error.
    assert result["result"].startswith("Prompt is too long"), result["result"]


@pytest.mark.skipif(
    not os.environ.get("CORTEX_SLOW_TESTS"), reason="takes 6 minutes: set CORTEX_SLOW_TESTS=1"
)
async def test_claude_code_waits_out_a_first_token_slower_than_its_watchdog(
    fleet: Any, tmp_path: pathlib.Path
) -> None:
    # Claude Code drops a stream that sends nothing but pings for 300 s, and
    # retries without streaming; the gateway's keep-alive is an empty text
    # delta, which its watchdog counts. The first token comes after 330 s.
    _, url = fleet
    status, result = await claude(url, tmp_path, "take your time", seconds=600)
    assert (status, result["is_error"]) == (0, False), result
    assert result["result"] == "Worth the wait."
    assert result["duration_api_ms"] < 400_000  # one request, not a retry after a timeout
