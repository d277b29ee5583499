"""Running real neurons in tests: port 0, real engines, graceful shutdown."""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar

import trio

from cortex.config import NeuronConfig, NeuronModel, NeuronSection
from cortex.neuron.app import NeuronHandle, run_neuron
from cortex.neuron.models import LoadRequest

T = TypeVar("T")


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


@contextmanager
def served_in_a_thread(factory: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enter ``factory()`` in a trio run on a thread of its own; leave it on exit.

    For servers shared by a module: pytest-trio runs each test and its async
    fixtures in a ``trio.run`` of their own, so a wider fixture is a sync
    one whose servers live in another thread's run. Tests reach them over
    loopback only; the value handed out is for its URLs, not for awaiting.

    Raises:
      whatever entering ``factory()`` raised; on exit, whatever leaving it did.
    """
    entered: queue.Queue[Any] = queue.Queue()
    failures: list[BaseException] = []

    async def serve() -> None:
        leave = trio.Event()
        async with factory() as value:
            entered.put((trio.lowlevel.current_trio_token(), leave, value))
            await leave.wait()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            failures.append(exc)
        finally:
            entered.put(None)  # wakes the caller if entering failed

    thread = threading.Thread(target=run, name="served_in_a_thread", daemon=True)
    thread.start()
    started = entered.get()
    if started is None:
        thread.join()
        raise failures[0]
    token, leave, value = started
    try:
        yield value
    finally:
        trio.from_thread.run_sync(leave.set, trio_token=token)
        thread.join(timeout=60)
        if failures:
            raise failures[0]
