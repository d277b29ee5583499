"""OpenAI's Codex CLI itself against a gateway and a neuron with the scripted engine.

Runs only where the ``codex`` CLI is installed (``npm install -g
@openai/codex``, whose platform binary comes from npm too; ``.ci/run``
installs it where npm can). It runs offline: ``CODEX_HOME`` is a temporary
directory whose ``config.toml`` names the gateway as the model provider
(the README's "Codex CLI" set-up), with its default tools but web search,
which runs at OpenAI.
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

CODEX = shutil.which("codex")
pytestmark = pytest.mark.skipif(
    CODEX is None, reason="the codex CLI is not installed (npm i -g @openai/codex)"
)

SHELL_CALL = (
    '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo cortex-tool-ok"}}'
    "\n</tool_call>"
)
CLOSE_CALL = (
    '<tool_call>\n{"name": "multi_agent_v1.close_agent", "arguments": {"target": "nobody"}}'
    "\n</tool_call>"
)
SCRIPT = {
    "rules": [
        {"when": "invalid agent id nobody", "reply": "There is no such agent."},
        {"when": "close the agent", "tools": True, "reply": CLOSE_CALL},
        {"when": "cortex-tool-ok", "reply": "The command printed cortex-tool-ok. Done."},
        {"when": "run the check", "tools": True, "reply": SHELL_CALL},
        {"when": "hello", "reply": "Hello from the cortex fleet!"},
    ],
    "default": "Scripted answer.",
}
CONFIG = """\
model_provider = "cortex"
model = "scripted"
web_search = "disabled"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[model_providers.cortex]
name = "cortex"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "CORTEX_API_KEY"

[analytics]
enabled = false
"""


@pytest.fixture
async def fleet(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    install_scripted_engine(tmp_path, monkeypatch)
    source = write_script(tmp_path, "codex", SCRIPT)
    # Codex's instructions and tools are ~30k bytes (a token a byte here).
    async with running_neuron([], options={}) as neuron:
        await neuron.neuron.manager.load(
            LoadRequest(model_id="scripted", source=source, options={"n_ctx": 200_000})
        )
        models = ModelsFile(models=[CatalogModel(id="scripted", vram_mb=1)])
        async with running_gateway(neuron.url, models) as gateway:
            yield neuron, gateway.api_url


async def codex(url: str, home: pathlib.Path, prompt: str, seconds: float = 60) -> list[Any]:
    """``codex exec --json prompt`` against ``url``: its events, after checking it succeeded."""
    codex_home = home / "codex"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(CONFIG.format(url=url))
    work = home / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "CORTEX_API_KEY": "sk-local",
    }
    assert CODEX is not None
    with trio.fail_after(seconds):
        done = await trio.run_process(
            [CODEX, "exec", "--json", "--skip-git-repo-check", prompt],
            env=env,
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    assert done.returncode == 0, (events, done.stderr.decode(errors="replace")[-2000:])
    assert events[-1]["type"] == "turn.completed", events
    return events


def items(events: list[Any], kind: str) -> list[Any]:
    return [
        e["item"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == kind
    ]


async def test_codex_answers_with_its_default_tools(fleet: Any, tmp_path: pathlib.Path) -> None:
    neuron, url = fleet
    events = await codex(url, tmp_path, "hello")
    assert [i["text"] for i in items(events, "agent_message")] == ["Hello from the cortex fleet!"]
    prompt = engine_model(neuron).prompts[-1]
    # Its default tools: functions, and the multi_agent_v1 namespace's as <namespace>.<name>.
    assert '"name": "exec_command"' in prompt
    assert '"name": "multi_agent_v1.spawn_agent"' in prompt


async def test_codex_runs_a_shell_command_and_sends_the_result(
    fleet: Any, tmp_path: pathlib.Path
) -> None:
    neuron, url = fleet
    events = await codex(url, tmp_path, "please run the check")
    [command] = items(events, "command_execution")
    assert "echo cortex-tool-ok" in command["command"]
    assert command["exit_code"] == 0 and command["aggregated_output"] == "cortex-tool-ok\n"
    assert [i["text"] for i in items(events, "agent_message")] == [
        "The command printed cortex-tool-ok. Done."
    ]
    # The second turn: the call as the model wrote it, then its output as the result.
    prompt = engine_model(neuron).prompts[-1]
    call = prompt.index('<tool_call>{"name": "exec_command"')
    result = prompt.index("<|tool|>call_")
    assert call < result and "cortex-tool-ok" in prompt[result:]


async def test_codex_runs_a_namespace_s_function(fleet: Any, tmp_path: pathlib.Path) -> None:
    # The call comes back as close_agent of namespace multi_agent_v1, which
    # Codex runs (there is no such agent) and answers on the next turn.
    neuron, url = fleet
    events = await codex(url, tmp_path, "please close the agent")
    assert [i["text"] for i in items(events, "agent_message")] == ["There is no such agent."]
    prompt = engine_model(neuron).prompts[-1]
    call = prompt.index('<tool_call>{"name": "multi_agent_v1.close_agent"')
    result = prompt.index("<|tool|>call_")
    assert call < result
    assert prompt[result:].split(": ", 1)[1].startswith("invalid agent id nobody")
