"""One poller task per neuron: discovery, health and loaded models.

``/discovery`` at start and every ``discovery_interval``; ``/health`` and
``/models`` every ``poll_interval``, or at once when something pokes the
neuron (a request failed on it, a load or unload finished). A neuron that
does not answer is marked down; the next good poll brings it back and clears
``suspect``. A neuron whose health says ``draining`` (shutting down) is
marked so: not routable for new requests or loads, what runs there left to
finish; once it stops listening it is down. A poll that fails is logged
when the neuron goes down and whenever the reason changes, so a neuron
never reached (a wrong endpoint or token) shows in the log too. A model
the neuron no longer lists is dropped. Each poll sets the gauges of the
neuron's queue and of its models' prompt caches.

Stalls: a model whose neuron says it has had requests running for longer
than ``stall_timeout`` without its engine making progress (``stalled_secs``;
a hung GPU kernel, a deadlocked decode thread, while the neuron's HTTP
server still answers) is marked stalled on that neuron: nothing new is
routed to it there, and the proxy fails over the requests waiting there for
their first byte. Logged at warning and counted once per stall; the first
poll that shows it moving again makes it routable again.
"""

from __future__ import annotations

import logging

import trio

from cortex.config import GatewaySection
from cortex.errors import CortexError
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.state import FleetState, NeuronState
from cortex.gateway.upstream import NeuronLink

log = logging.getLogger(__name__)


async def refresh(api: NeuronLink, state: FleetState, neuron: NeuronState) -> None:
    """Fetch health and models of ``neuron`` now and record them.

    Raises:
      CortexError: the neuron could not be reached or answered badly; it is
        marked down before this propagates.
    """
    epoch = neuron.epoch
    try:
        health = await api.health(neuron)
        models = await api.models(neuron)
    except CortexError as exc:
        mark_down(state, neuron, exc.message)
        raise
    # A load or eviction recorded meanwhile is newer than this answer may
    # be; whoever recorded it refreshes again.
    if neuron.epoch == epoch:
        neuron.health = health
        neuron.models = {m.id: m for m in models}
        neuron.foreign = {
            m.id: m.in_flight + m.queued - neuron.in_flight.get(m.id, 0)
            for m in models
            if m.in_flight + m.queued > neuron.in_flight.get(m.id, 0)
        }
    # Our own counts stay only for models the neuron still has.
    for model_id in list(neuron.last_used):
        if model_id not in neuron.models and not neuron.in_flight.get(model_id):
            del neuron.last_used[model_id]
    if not neuron.up:
        log.info("neuron %s is up (%s)", neuron.name, neuron.endpoint)
    if health.draining and not neuron.draining:
        log.info("neuron %s is draining: routing nothing new to it", neuron.name)
    neuron.up, neuron.suspect, neuron.last_error = True, False, None
    neuron.draining = health.draining
    neuron.last_seen = state.clock()
    state.changed()


def mark_down(state: FleetState, neuron: NeuronState, reason: str) -> None:
    """Record ``neuron`` as down for ``reason``.

    Logged at warning when it goes down, and when it is down from the start
    (a wrong endpoint or token) or for a new reason: once per reason, not
    once per poll.
    """
    if neuron.up:
        log.warning("neuron %s is down: %s", neuron.name, reason)
    elif reason != neuron.last_error:
        log.warning("neuron %s (%s) cannot be polled: %s", neuron.name, neuron.endpoint, reason)
    neuron.up = neuron.draining = False
    neuron.last_error = reason
    state.changed()


async def poll_neuron(
    api: NeuronLink,
    state: FleetState,
    neuron: NeuronState,
    section: GatewaySection,
    metrics: GatewayMetrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``neuron``'s state current until cancelled."""
    task_status.started()
    next_discovery = trio.current_time()
    exported: set[str] = set()
    while True:
        if trio.current_time() >= next_discovery or neuron.discovery is None:
            try:
                neuron.discovery = await api.discovery(neuron)
                next_discovery = trio.current_time() + section.discovery_interval
            except CortexError as exc:
                mark_down(state, neuron, exc.message)
        if neuron.discovery is not None:
            try:
                await refresh(api, state, neuron)
            except CortexError:
                pass
        track_stalls(state, neuron, section.stall_timeout, metrics)
        metrics.neuron_up.labels(neuron.name).set(1 if neuron.up else 0)
        if neuron.health is not None:
            metrics.queue_depth.labels(neuron.name).set(neuron.health.queue_depth)
        exported = export_prompt_cache(neuron, metrics, exported)
        neuron.polled.set()
        with trio.move_on_after(section.poll_interval):
            await neuron.poke.wait()
        neuron.poke = trio.Event()


def track_stalls(
    state: FleetState, neuron: NeuronState, limit: float, metrics: GatewayMetrics
) -> None:
    """Mark the models of ``neuron`` stalled past ``limit`` seconds (0: never), unmark the rest.

    A neuron that is down has nothing stalled: it serves nothing anyway, and
    its models are judged afresh once it is back.
    """
    stalled: set[str] = set()
    if limit > 0 and neuron.up:
        stalled = {m.id for m in neuron.models.values() if m.stalled_secs > limit}
    if stalled == neuron.stalled:
        return
    for model_id in sorted(stalled - neuron.stalled):
        log.warning(
            "model %s on neuron %s has made no progress for %.0f s with requests running "
            "(stall_timeout %g s): routing nothing more to it there, failing its waiting "
            "requests over",
            model_id,
            neuron.name,
            neuron.models[model_id].stalled_secs,
            limit,
        )
        metrics.stalls.labels(model_id, neuron.name).inc()
    for model_id in sorted(neuron.stalled - stalled):
        if neuron.up and model_id in neuron.models:
            log.info("model %s on neuron %s is making progress again", model_id, neuron.name)
    neuron.stalled = stalled
    state.changed()


def export_prompt_cache(
    neuron: NeuronState, metrics: GatewayMetrics, exported: set[str]
) -> set[str]:
    """Set the prompt cache gauges of ``neuron``'s models; returns the models exported.

    Those in ``exported`` (the last call's) that no longer report a cache
    lose their series: the figures count from a load.
    """
    now: set[str] = set()
    for model_id, status in neuron.models.items():
        cache = status.prompt_cache
        if cache is None:
            continue
        now.add(model_id)
        served = cache.hits + cache.misses
        ratio = cache.hits / served if served else 0.0
        metrics.prompt_cache_hit_ratio.labels(model_id, neuron.name).set(ratio)
        metrics.prompt_cache_reused_tokens.labels(model_id, neuron.name).set(
            cache.slot_tokens + cache.host_tokens
        )
    for model_id in exported - now:
        for gauge in (metrics.prompt_cache_hit_ratio, metrics.prompt_cache_reused_tokens):
            try:
                gauge.remove(model_id, neuron.name)
            except KeyError:
                pass
    return now
