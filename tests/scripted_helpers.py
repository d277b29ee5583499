"""The scripted engine (``tests/plugins/cortex_scripted.py``) in tests: install, script, serve.

The engine is installed the way any third-party engine is: a dist-info with
a ``cortex.harness`` entry point, put on ``sys.path`` for one test only (via
``monkeypatch``), so other tests' neurons never see it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from cortex.config import GatewayConfig, GatewaySection, ModelsFile, NeuronEndpoint
from cortex.gateway.app import GatewayHandle, run_gateway
from cortex.neuron.app import NeuronHandle

PLUGINS = pathlib.Path(__file__).parent / "plugins"


def install_scripted_engine(directory: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the scripted engine through a ``cortex.harness`` entry point."""
    site = directory / "site"
    dist = site / "cortex_scripted-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cortex-scripted\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cortex.harness]\nscripted = cortex_scripted\n")
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(site))


def write_script(directory: pathlib.Path, name: str, script: dict[str, Any]) -> str:
    """A ``*.script.json`` model file; its path."""
    path = directory / f"{name}.script.json"
    path.write_text(json.dumps(script))
    return str(path)


def engine_model(neuron: NeuronHandle, model_id: str = "scripted") -> Any:
    """The loaded ``ScriptedModel`` (its ``prompts`` and ``samplings`` record each call)."""
    return neuron.neuron.manager.slots[model_id].model


@asynccontextmanager
async def running_gateway(neuron_url: str, models: ModelsFile) -> AsyncIterator[GatewayHandle]:
    """A gateway on 127.0.0.1:0 whose one neuron is ``neuron_url``."""
    config = GatewayConfig(
        gateway=GatewaySection(
            listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", grace_period=1.0
        ),
        neurons=[NeuronEndpoint("n1", neuron_url)],
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        handle: GatewayHandle = await nursery.start(
            partial(run_gateway, config, models, shutdown=shutdown)
        )
        try:
            yield handle
        finally:
            shutdown.set()
