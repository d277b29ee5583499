"""The harness: a trace replayed through the gateway's router in virtual time.

:func:`replay` builds what ``run_gateway`` builds for routing (fleet state,
router with its policy, one poller per neuron) over :class:`SimNeuron` s and
runs it under ``MockClock(autojump_threshold=0)``: whenever every task
waits, the clock jumps to the next deadline. Each trace line becomes a
client that does what the proxy does (``acquire``, send, ``release``; a
neuron that no longer has the model is ``forget`` -ten and the request is
routed again) and what an SDK does with a 503 or 429: wait its Retry-After
and try again, up to ``retries`` times and never past ``max_wait`` after it
came.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing

from cortex.errors import CortexError, ModelNotFound, QueueFull, Unavailable
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.poller import poll_neuron
from cortex.gateway.router import Router
from cortex.gateway.state import FleetState
from cortex.sim.fleet import FleetFile
from cortex.sim.neuron import SimLink, SimNeuron

#: The wall clock the fake fleet reports in: a fixed epoch plus virtual time.
EPOCH = 1_700_000_000.0
#: Retries a client makes after a 503 (Claude Code's default is 10; the SDKs' 2).
RETRIES = 10


@attrs.frozen
class TraceRequest:
    """One line of a trace: ``{"t": s, "model": id, "prompt_tokens": n, "max_tokens": n}``."""

    t: float
    model: str
    prompt_tokens: int = 500
    max_tokens: int = 200


def read_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """The requests of a JSON-lines trace, by time.

    Raises:
      ValueError: a line is not a request (its number and the reason).
    """
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                requests.append(
                    TraceRequest(
                        t=float(data["t"]),
                        model=str(data["model"]),
                        prompt_tokens=int(data.get("prompt_tokens", 500)),
                        max_tokens=int(data.get("max_tokens", 200)),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a trace request: {exc}") from None
    return sorted(requests, key=lambda r: r.t)


@attrs.define
class Outcome:
    request: TraceRequest
    #: Seconds from arrival to the first token; None: never served.
    ttft: float | None = None
    #: Seconds from arrival until a neuron took it (queue, loads, retries).
    wait: float | None = None
    retries: int = 0
    neuron: str | None = None
    error: str | None = None


@attrs.frozen
class Sample:
    """The fleet at one moment: requests waiting (gateway and neurons), models loaded."""

    t: float
    waiting: int
    loaded: int
    loading: int


@attrs.define
class Result:
    policy: str
    outcomes: list[Outcome]
    samples: list[Sample]
    cold_loads: int
    evictions: int
    scale_ins: int
    thrash: int
    max_wait: float
    duration: float
    decisions: dict[str, int]

    @property
    def served(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ttft is not None]

    @property
    def unserved(self) -> int:
        return len(self.outcomes) - len(self.served)


def thrash_count(logs: Iterable[tuple[float, str, str]], window: float) -> int:
    """Loads of a model within ``window`` seconds after its last unload anywhere."""
    unloaded: dict[str, float] = {}
    count = 0
    for t, what, model_id in sorted(logs):
        if what == "unload":
            unloaded[model_id] = t
        elif model_id in unloaded:
            count += t - unloaded.pop(model_id) <= window
    return count


def _metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def _client(
    router: Router,
    sims: dict[str, SimNeuron],
    request: TraceRequest,
    outcome: Outcome,
    backing_off: list[int],
    *,
    max_wait: float,
    retries: int,
) -> None:
    came = trio.current_time()
    exclude: set[str] = set()
    while True:
        try:
            neuron = await router.acquire(request.model, exclude=exclude)
        except (Unavailable, QueueFull) as exc:
            later = trio.current_time() + exc.retry_after
            if outcome.retries >= retries or later - came > max_wait:
                outcome.error = exc.message
                return
            outcome.retries += 1
            backing_off[0] += 1
            try:
                await trio.sleep_until(later)
            finally:
                backing_off[0] -= 1
            continue
        except CortexError as exc:
            outcome.error = exc.message
            return
        routed = trio.current_time()
        try:
            generation = await sims[neuron.name].generate(
                request.model, request.prompt_tokens, request.max_tokens
            )
        except ModelNotFound:
            router.release(neuron, request.model)
            router.forget(neuron, request.model)
            continue
        except BaseException:
            router.release(neuron, request.model)
            raise
        outcome.ttft = generation.first_token_at - came
        outcome.wait = routed - came
        outcome.neuron = neuron.name
        router.release(
            neuron,
            request.model,
            first_token_s=outcome.ttft,
            completion_tokens=generation.completion_tokens,
            decode_s=generation.done_at - generation.first_token_at,
        )
        return


async def _sample(
    router: Router,
    sims: dict[str, SimNeuron],
    samples: list[Sample],
    backing_off: list[int],
    every: float,
) -> None:
    while True:
        samples.append(
            Sample(
                t=trio.current_time(),
                # At the gateway, on the neurons, and clients told to retry later.
                waiting=router.queue.depth()
                + sum(r.queued for s in sims.values() for r in s.resident.values())
                + backing_off[0],
                loaded=sum(len(s.resident) for s in sims.values()),
                loading=sum(len(s.loading) for s in sims.values()),
            )
        )
        await trio.sleep(every)


async def run_replay(
    fleet: FleetFile,
    trace: list[TraceRequest],
    policy: str,
    *,
    retries: int = RETRIES,
    sample_every: float = 10.0,
    routing: dict[str, Any] | None = None,
) -> Result:
    """Replay ``trace`` on ``fleet`` under ``policy``; call under a MockClock."""
    config = fleet.gateway_config(policy, **(routing or {}))
    max_wait = config.routing.max_wait
    state = FleetState.build(
        config.neurons, fleet.catalogue(), clock=lambda: EPOCH + trio.current_time()
    )
    models = {m.id: m for m in fleet.models}
    sims = {n.name: SimNeuron(n, models, state.clock) for n in fleet.neurons}
    link = SimLink(sims)
    metrics = GatewayMetrics.create()
    router = Router(config=config, state=state, api=link, metrics=metrics)
    outcomes = [Outcome(r) for r in trace]
    samples: list[Sample] = []
    backing_off = [0]
    start = trio.current_time()
    async with trio.open_nursery() as background:
        router.nursery = background
        for neuron in state.neurons.values():
            background.start_soon(
                partial(poll_neuron, link, state, neuron, config.gateway, metrics)
            )
        background.start_soon(_sample, router, sims, samples, backing_off, sample_every)
        await state.wait_polled()
        async with trio.open_nursery() as clients:
            for outcome in outcomes:
                await trio.sleep_until(start + outcome.request.t)
                clients.start_soon(
                    partial(
                        _client,
                        router,
                        sims,
                        outcome.request,
                        outcome,
                        backing_off,
                        max_wait=max_wait,
                        retries=retries,
                    )
                )
        duration = trio.current_time() - start
        background.cancel_scope.cancel()
    logs = [entry for s in sims.values() for entry in s.log]
    kinds = ("loaded", "loading", "cold", "evict", "scale_out", "scale_in", "queued", "rejected")
    return Result(
        policy=policy,
        outcomes=outcomes,
        samples=samples,
        cold_loads=sum(1 for _, what, _ in logs if what == "load"),
        evictions=int(
            sum(
                _metric(metrics, "cortex_evictions_total", model=m, neuron=n)
                for m in models
                for n in sims
            )
        ),
        scale_ins=int(_metric(metrics, "cortex_route_decisions_total", kind="scale_in")),
        thrash=thrash_count(logs, config.routing.thrash_window),
        max_wait=max_wait,
        duration=duration,
        decisions={k: int(_metric(metrics, "cortex_route_decisions_total", kind=k)) for k in kinds},
    )


def replay(
    fleet: FleetFile,
    trace: list[TraceRequest],
    policy: str,
    **kwargs: Any,
) -> Result:
    """:func:`run_replay` in a ``trio.run`` of its own, in virtual time.

    Two replays of one trace differ by a few per cent: trio runs ready tasks
    in a deliberately random order, and equal deadlines fire in any order.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(partial(run_replay, fleet, trace, policy, **kwargs), clock=clock)
