"""Running real neurons in tests: port 0, real engines, graceful shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from cortex.config import NeuronConfig, NeuronModel, NeuronSection
from cortex.neuron.app import NeuronHandle, run_neuron
from cortex.neuron.models import LoadRequest


def neuron_config(models: Iterable[tuple[str, str]] = (), **section: Any) -> NeuronConfig:
    section.setdefault("listen", "127.0.0.1:0")
    section.setdefault("memory_budget_mb", 4096)
    section.setdefault("sample_interval", 0.05)
    section.setdefault("grace_period", 5.0)
    return NeuronConfig(
        neuron=NeuronSection(**section),
        models=[NeuronModel(id=model_id, source=source) for model_id, source in models],
    )


@asynccontextmanager
async def running_neuron(
    models: Iterable[tuple[str, str]] = (),
    *,
    plugins: Iterable[object] = (),
    options: dict[str, Any] | None = None,
    **section: Any,
) -> AsyncIterator[NeuronHandle]:
    """A neuron on 127.0.0.1:0 with ``models`` (id, source) loaded before it is handed out."""
    models = list(models)
    if options is None:
        options = {"n_threads": 1} if not plugins else {}
    config = neuron_config(**section)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        handle: NeuronHandle = await nursery.start(
            partial(run_neuron, config, shutdown=shutdown, plugins=plugins)
        )
        for model_id, source in models:
            # One thread: on two shared cores a second one makes decode erratic.
            await handle.neuron.manager.load(
                LoadRequest(model_id=model_id, source=source, options=options)
            )
        try:
            yield handle
        finally:
            shutdown.set()
