"""A gateway and a neuron with the scripted test engine, for running Claude Code offline.

    .venv/bin/python contrib/claude-code/scripted_fleet.py --port 31399 \\
        --capture /tmp/claude-code.jsonl

serves the model ``scripted`` (aliases ``claude-sonnet``, ``claude-haiku``)
whose answers are fixed per prompt (``DEFAULT_SCRIPT`` below, or
``--script FILE``), and appends every request the gateway receives
(method, path, headers, JSON body) and every prompt the engine rendered to
the ``--capture`` file as JSON lines. See ``README.md`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
from functools import partial
from typing import Any

import trio

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cortex.config import (  # noqa: E402
    CatalogModel,
    GatewayConfig,
    GatewaySection,
    ModelsFile,
    NeuronEndpoint,
)
from cortex.gateway import app as gateway_app  # noqa: E402
from cortex.neuron.app import run_neuron  # noqa: E402
from cortex.neuron.models import LoadRequest  # noqa: E402
from tests.neuron_helpers import neuron_config  # noqa: E402

READ = '<tool_call>\n{"name": "Read", "arguments": {"file_path": "MARKER"}}\n</tool_call>'
BASH = (
    '<tool_call>\n{"name": "Bash", "arguments": {"command": "echo cortex-tool-ok", '
    '"description": "Print a marker"}}\n</tool_call>'
)
WRITE = (
    '<tool_call>\n{"name": "Write", "arguments": {"file_path": "/tmp/cortex-denied.txt", '
    '"content": "x"}}\n</tool_call>'
)
DEFAULT_SCRIPT: dict[str, Any] = {
    "rules": [
        # After the tool ran, Claude Code sends its output back as a tool_result.
        {"when": "cortex-tool-ok", "reply": "The command printed cortex-tool-ok. Done."},
        {"when": "run the check", "tools": True, "reply": "Running it.\n" + BASH},
        {"when": "read the marker", "tools": True, "reply": READ},
        {"when": "two at once", "tools": True, "reply": READ + "\n" + BASH},
        # Not allowed in -p mode without --allowedTools: an is_error tool_result.
        {"when": "write the file", "tools": True, "reply": WRITE},
        {"when": "haven't granted it", "reply": "I was not allowed to write the file."},
        {"when": "hello", "reply": "Hello from the cortex fleet!"},
    ],
    "default": "Scripted answer.",
}


def install_scripted_engine(site: pathlib.Path) -> None:
    """The test engine through a ``cortex.harness`` entry point, as a third party installs one."""
    dist = site / "cortex_scripted-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cortex-scripted\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cortex.harness]\nscripted = cortex_scripted\n")
    sys.path[:0] = [str(ROOT / "tests" / "plugins"), str(site)]


def capturing(create_app: Any, capture: pathlib.Path, prompts: list[str]) -> Any:
    """``create_app`` whose app appends each request (headers, body) to ``capture``.

    After each request, the prompts the engine rendered for it (new entries
    of ``prompts``) follow as ``{"prompt": ...}`` lines.
    """
    written = len(prompts)

    def create(gateway: Any) -> Any:
        inner = create_app(gateway)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            chunks: list[bytes] = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            data = b"".join(chunks)
            try:
                body: Any = json.loads(data) if data else None
            except ValueError:
                body = data.decode(errors="replace")
            record = {
                "request": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "body": body,
            }
            with capture.open("a") as f:
                f.write(json.dumps(record) + "\n")

            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()

            async def send_logged(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    with capture.open("a") as f:
                        f.write(json.dumps({"status": message["status"]}) + "\n")
                await send(message)

            await inner(scope, replay, send_logged)
            nonlocal written
            with capture.open("a") as f:
                for prompt in prompts[written:]:
                    f.write(json.dumps({"prompt": prompt}) + "\n")
            written = len(prompts)

        return app

    return create


async def main(args: argparse.Namespace) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="cortex-scripted-"))
    install_scripted_engine(work / "site")
    script = json.loads(args.script.read_text()) if args.script else DEFAULT_SCRIPT
    source = work / "claude.script.json"
    source.write_text(json.dumps(script))
    models = ModelsFile(
        models=[CatalogModel(id="scripted", vram_mb=1)],
        aliases={"claude-sonnet": "scripted", "claude-haiku": "scripted"},
    )
    neuron_shutdown, shutdown = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        neuron = await nursery.start(partial(run_neuron, neuron_config(), shutdown=neuron_shutdown))
        await neuron.neuron.manager.load(
            LoadRequest(model_id="scripted", source=str(source), options={"n_ctx": args.n_ctx})
        )
        if args.capture:
            model = neuron.neuron.manager.slots["scripted"].model
            gateway_app.create_app = capturing(gateway_app.create_app, args.capture, model.prompts)
        config = GatewayConfig(
            gateway=GatewaySection(
                listen=f"127.0.0.1:{args.port}", metrics_listen="127.0.0.1:0", grace_period=1.0
            ),
            neurons=[NeuronEndpoint("local", neuron.url)],
        )
        try:
            gateway = await nursery.start(partial(run_gateway, config, models, shutdown))
            print(f"gateway on {gateway.api_url}", flush=True)
            await trio.sleep_forever()
        finally:
            shutdown.set()
            neuron_shutdown.set()


async def run_gateway(
    config: GatewayConfig,
    models: ModelsFile,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    await gateway_app.run_gateway(config, models, shutdown=shutdown, task_status=task_status)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=31399)
    parser.add_argument("--script", type=pathlib.Path, help="a JSON script (default: built in)")
    parser.add_argument("--capture", type=pathlib.Path, help="append requests here (JSON lines)")
    parser.add_argument(
        "--n-ctx", type=int, default=200_000, help="the model's context, one token a byte"
    )
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        pass
