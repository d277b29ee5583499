"""The harness: a trace replayed through the gateway's router in virtual time.

:func:`replay` builds what ``run_gateway`` builds for routing (fleet state,
router with its policy, one poller per neuron) over :class:`SimNeuron` s and
runs it under ``MockClock(autojump_threshold=0)``: whenever every task
waits, the clock jumps to the next deadline.

Each request becomes a client that does what the proxy does (``acquire``,
send, ``release`` with what the proxy can tell: a stream's time to first
token, token counts only where the answer carries usage; a neuron that no
longer has the model is ``forget`` -ten and the request is routed again) and
what an SDK does with a 503 or 429: wait its Retry-After and try again, up
to ``retries`` times and never past ``max_wait`` after it came; then it is
unserved.

A request with token runs (``prompt``, an agent session's turn) is sent as
a body whose prompt bytes are those runs (``cortex.sim.cache.render``), with
its session ``key`` as Claude Code's session header: the router's session
affinity (``cortex.gateway.affinity``) sees what it would see from a real
client, and the fake neuron's prompt cache serves what a real one would.
Every other request is a prompt of its own that the fake neurons cache like
any other (it takes a slot, pushing a session's tokens to the host tier),
but the router is not shown it: the real gateway would index it too and add
its prefill to every option's prediction, which shifts the policies'
figures on the ordinary traces (patience 30 on the short test trace: 81
cold loads instead of 77) with nothing cached to gain.

Sessions are closed-loop by default: a session's next request is sent once
the previous one was answered (or given up) plus its think time, so a
request held back delays the rest of its session as it would a real agent.
Open-loop replays send every request at its time in the trace.

A replay is reproducible: trio's scheduler, which runs ready tasks in a
random order, is made deterministic for a ``seed`` (pytest-trio does the
same under Hypothesis). Different seeds give the run-to-run spread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, Literal

import attrs
import trio
import trio.testing

from cortex.errors import CortexError, ModelNotFound, QueueFull, Unavailable
from cortex.gateway import affinity
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.poller import poll_neuron
from cortex.gateway.router import Router
from cortex.gateway.scheduler import make_policy
from cortex.gateway.state import FleetState
from cortex.sim.cache import Runs, length, render
from cortex.sim.clairvoyant import CLAIRVOYANT, Rule, Sends, factory
from cortex.sim.fleet import FleetFile
from cortex.sim.neuron import SimLink, SimNeuron

#: The wall clock the fake fleet reports in: a fixed epoch plus virtual time.
EPOCH = 1_700_000_000.0
#: Retries a client makes after a 503 (Claude Code's default is 10; the SDKs' 2).
RETRIES = 10

Loop = Literal["closed", "open"]


@attrs.frozen
class TraceRequest:
    """One line of a trace.

    ``{"t": s, "model": id, "prompt_tokens": n, "max_tokens": n, "stream": b,
    "usage": b, "session": n, "think": s, "prompt": [[name, n], ...],
    "answer": name, "key": str, "tool": b}``; only ``t`` and ``model`` are required.
    ``usage``: the answer carries token counts (a non-streamed answer always
    does; a stream only when the client asked for them). ``think``: in a
    closed-loop replay, seconds after the session's previous answer that
    this request is sent (the first of a session goes at ``t``). ``prompt``:
    its tokens as named runs (``cortex.sim.cache``; ``prompt_tokens`` is
    then their sum), ``answer`` the name of the run its completion is (the
    next turn repeats it), ``key`` the session key the client sends.
    ``tool``: the answer calls a tool (the next request of the session
    brings its result, ``think`` being the tool's run): the client tells
    the router as the proxy would (``Router.release(follows=True)``);
    absent, false.
    """

    t: float
    model: str
    prompt_tokens: int = 500
    max_tokens: int = 200
    stream: bool = True
    usage: bool = False
    session: int | None = None
    think: float = 0.0
    prompt: Runs = ()
    answer: str | None = None
    key: str | None = None
    tool: bool = False

    @property
    def agent(self) -> bool:
        """A turn of an agent session (its prompt given as token runs)."""
        return bool(self.prompt)


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
                session = data.get("session")
                runs = tuple((str(name), int(n)) for name, n in data.get("prompt", ()))
                if any(n <= 0 for _, n in runs):
                    raise ValueError("a prompt run has no tokens")
                answer, key = data.get("answer"), data.get("key")
                requests.append(
                    TraceRequest(
                        t=float(data["t"]),
                        model=str(data["model"]),
                        prompt_tokens=length(runs) or int(data.get("prompt_tokens", 500)),
                        max_tokens=int(data.get("max_tokens", 200)),
                        stream=bool(data.get("stream", True)),
                        usage=bool(data.get("usage", False)),
                        session=None if session is None else int(session),
                        think=float(data.get("think", 0.0)),
                        prompt=runs,
                        answer=None if answer is None else str(answer),
                        key=None if key is None else str(key),
                        tool=bool(data.get("tool", False)),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a trace request: {exc}") from None
    return sorted(requests, key=lambda r: r.t)


@attrs.define
class Outcome:
    request: TraceRequest
    #: Seconds after the trace's start it was sent (closed loop: after its
    #: session's previous answer and think time).
    sent: float | None = None
    #: Seconds from sending to the first token; None: never served.
    ttft: float | None = None
    #: Seconds from sending until a neuron started on it (the gateway's
    #: queue, loads, retries and the neuron's own queue).
    wait: float | None = None
    retries: int = 0
    neuron: str | None = None
    error: str | None = None
    #: Its place in its session (0: the first request).
    turn: int = 0
    #: Prompt tokens the neuron read from its prompt cache (slot or host
    #: tier), and of those restored from the host tier.
    cached: int = 0
    restored: int = 0


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
    #: Loads a neuron refused for want of memory (the router misjudged it).
    refused: int = 0
    seed: int = 0
    #: The router's session affinity: requests routed to the replica it
    #: remembered for them, elsewhere, and with none remembered.
    affinity: dict[str, int] = attrs.field(factory=dict)
    #: Cached prompt tokens (slots and host tiers) thrown away by unloads.
    dropped_tokens: int = 0
    #: What became of the follow-ups of answers that called a tool
    #: (``FollowUps.statistics``: kept, evicted, late, expired, pending).
    follow_ups: dict[str, int] = attrs.field(factory=dict)
    #: Unloads of the models agent sessions use (evictions and scale-ins).
    agent_unloads: int = 0
    #: Prompt tokens reused, as the gateway's pollers last read them from
    #: the neurons' model listings (``cortex_prompt_cache_reused_tokens``,
    #: summed over models and neurons; since each model's load).
    reported_cached_tokens: int = 0

    @property
    def served(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ttft is not None]

    @property
    def unserved(self) -> int:
        return len(self.outcomes) - len(self.served)

    @property
    def late(self) -> int:
        """Requests served after waiting longer than ``max_wait``."""
        return sum(1 for o in self.served if o.wait is not None and o.wait > self.max_wait)

    def ttfts(self) -> list[float]:
        """Every request's time to first token; ``inf`` for one never served."""
        return [math.inf if o.ttft is None else o.ttft for o in self.outcomes]


def thrash_count(logs: Iterable[tuple[float, str, str]], window: float) -> int:
    """Loads of a model within ``window`` seconds after its last unload anywhere."""
    unloaded: dict[str, float] = {}
    count = 0
    for t, what, model_id in sorted(logs):
        if what == "unload":
            unloaded[model_id] = t
        elif what == "load" and model_id in unloaded:
            count += t - unloaded.pop(model_id) <= window
    return count


def _samples(metrics: GatewayMetrics, *names: str) -> dict[tuple[str, frozenset], float]:
    """The values of the counters ``names``, by (name, labels), in one pass over the registry."""
    found: dict[tuple[str, frozenset], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in names:
                key = (sample.name, frozenset(sample.labels.items()))
                found[key] = found.get(key, 0.0) + sample.value
    return found


@attrs.define(eq=False)
class _Clients:
    """What every simulated client shares: the router, the neurons, the rules."""

    router: Router
    sims: dict[str, SimNeuron]
    max_wait: float
    retries: int
    start: float
    #: Clients sleeping on a Retry-After now (for the samples).
    backing_off: int = 0
    #: What a clairvoyant reference policy knows of the sends to come.
    sends: Sends | None = None

    async def send(self, outcome: Outcome) -> None:
        """Send one request as a client would, until served or given up."""
        request = outcome.request
        came = trio.current_time()
        outcome.sent = came - self.start
        router = self.router
        exclude: set[str] = set()
        prompt = None
        if request.agent:
            session = affinity.session_key(request.key, {})
            prompt = affinity.prompt_of(body(request), session)
        while True:
            attempt = trio.current_time()
            try:
                neuron = await router.acquire(request.model, exclude=exclude, prompt=prompt)
            except (Unavailable, QueueFull) as exc:
                later = trio.current_time() + exc.retry_after
                if outcome.retries >= self.retries or later - came > self.max_wait:
                    outcome.error = exc.message
                    return
                outcome.retries += 1
                self.backing_off += 1
                try:
                    await trio.sleep_until(later)
                finally:
                    self.backing_off -= 1
                continue
            except CortexError as exc:
                outcome.error = exc.message
                return
            try:
                generation = await self.sims[neuron.name].generate(
                    request.model,
                    request.prompt_tokens,
                    request.max_tokens,
                    prompt=request.prompt or None,
                    answer=request.answer,
                )
            except ModelNotFound:
                router.release(neuron, request.model, prompt=prompt)
                router.forget(neuron, request.model)
                continue
            except BaseException:
                router.release(neuron, request.model, prompt=prompt)
                raise
            outcome.ttft = generation.first_token_at - came
            outcome.wait = generation.slot_at - came
            outcome.neuron = neuron.name
            outcome.cached = generation.cached_tokens
            outcome.restored = generation.restored_tokens
            # What the proxy can tell (proxy.finish): a stream's first chunk
            # marks its first token and the start of decoding; a whole body
            # says neither. Token counts come only with usage in the answer.
            counts = request.usage or not request.stream
            first_token_s = generation.first_token_at - attempt if request.stream else None
            decode_s = generation.done_at - generation.first_token_at
            router.release(
                neuron,
                request.model,
                first_token_s=first_token_s,
                completion_tokens=generation.completion_tokens if counts else None,
                decode_s=decode_s if counts and request.stream else None,
                prompt=prompt,
                follows=request.tool,
            )
            return

    async def session(self, outcomes: list[Outcome]) -> None:
        """A session's requests in turn, each its think time after the previous answer."""
        key = id(outcomes)
        for n, outcome in enumerate(outcomes):
            outcome.turn = n
            if n:
                await trio.sleep(outcome.request.think)
            if self.sends is not None:
                self.sends.sending(key, outcome.request.model, trio.current_time())
            await self.send(outcome)
            if self.sends is not None:
                following = outcomes[n + 1].request if n + 1 < len(outcomes) else None
                self.sends.answered(
                    key,
                    outcome.request.model if following is None else following.model,
                    trio.current_time(),
                    None if following is None else following.think,
                )


async def _sample(
    clients: _Clients, samples: list[Sample], every: float, *, until: trio.Event
) -> None:
    router, sims = clients.router, clients.sims
    while not until.is_set():
        samples.append(
            Sample(
                t=trio.current_time() - clients.start,
                # At the gateway, on the neurons, and clients told to retry later.
                waiting=router.queue.depth()
                + sum(r.queued for s in sims.values() for r in s.resident.values())
                + clients.backing_off,
                loaded=sum(len(s.resident) for s in sims.values()),
                loading=sum(len(s.loading) for s in sims.values()),
            )
        )
        with trio.move_on_after(every):
            await until.wait()


def body(request: TraceRequest) -> bytes:
    """The request as the gateway's affinity reads it: the prompt's bytes after ``"messages"``."""
    head = json.dumps({"model": request.model, "stream": request.stream})[:-1]
    return f'{head}, "messages": "'.encode() + render(request.prompt) + b'"}'


def sessions(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """The trace's sessions in order of their first request; a request without one alone."""
    grouped: dict[object, list[Outcome]] = {}
    for n, outcome in enumerate(outcomes):
        session = outcome.request.session
        grouped.setdefault(("alone", n) if session is None else session, []).append(outcome)
    return sorted(grouped.values(), key=lambda s: s[0].request.t)


async def run_replay(
    fleet: FleetFile,
    trace: list[TraceRequest],
    policy: str,
    *,
    retries: int = RETRIES,
    sample_every: float = 10.0,
    routing: dict[str, Any] | None = None,
    loop: Loop = "closed",
    rule: Rule | None = None,
) -> Result:
    """Replay ``trace`` on ``fleet`` under ``policy``; call under a MockClock.

    ``policy``: a ``[routing] policy``, or a reference of
    :mod:`cortex.sim.clairvoyant` (the predictive policy's settings apply;
    closed loop only; ``rule``: its constants, the defaults where None).

    Raises:
      ValueError: a clairvoyant reference in an open-loop replay.
    """
    knows = CLAIRVOYANT.get(policy)
    if knows is not None and loop != "closed":
        raise ValueError(f"{policy} needs a closed-loop replay: it knows when sessions send")
    outcomes = [Outcome(r) for r in trace]
    groups = sessions(outcomes) if loop == "closed" else [[o] for o in outcomes]
    rule = rule or Rule()
    sends = (
        Sends.of(knows, [r.think for r in trace], len(groups), rule.horizon)
        if knows is not None
        else None
    )
    config = fleet.gateway_config("predictive" if knows else policy, **(routing or {}))
    max_wait = config.routing.max_wait
    state = FleetState.build(
        config.neurons, fleet.catalogue(), clock=lambda: EPOCH + trio.current_time()
    )
    models = {m.id: m for m in fleet.models}
    sims = {n.name: SimNeuron(n, models, state.clock) for n in fleet.neurons}
    for sim in sims.values():
        sim.activate()
    link = SimLink(sims)
    metrics = GatewayMetrics.create()
    router = Router(
        config=config,
        state=state,
        api=link,
        metrics=metrics,
        policy_factory=factory(sends, rule) if sends is not None else make_policy,
    )
    samples: list[Sample] = []
    clients = _Clients(router, sims, max_wait, retries, trio.current_time(), sends=sends)
    over = trio.Event()
    async with trio.open_nursery() as background:
        await background.start(router.loader.run)
        if any(m.pinned_on for m in state.catalogue.models.values()):
            # Only where something is pinned: its task, waking at every
            # change, would otherwise reorder the others for nothing.
            await background.start(router.preloader.run)
        for neuron in state.neurons.values():
            background.start_soon(
                partial(poll_neuron, link, state, neuron, config.gateway, metrics)
            )
        await state.wait_polled()
        clients.start = trio.current_time()
        background.start_soon(partial(_sample, clients, samples, sample_every, until=over))
        if sends is not None:
            for group in groups:
                sends.start(group[0].request.model, clients.start + group[0].request.t)
        async with trio.open_nursery() as nursery:
            for group in groups:
                await trio.sleep_until(clients.start + group[0].request.t)
                nursery.start_soon(clients.session, group)
        duration = trio.current_time() - clients.start
        over.set()
        background.cancel_scope.cancel()
    logs = [entry for s in sims.values() for entry in s.log]
    agent_models = {r.model for r in trace if r.agent}
    kinds = ("loaded", "loading", "cold", "evict", "scale_out", "scale_in", "queued", "rejected")
    counters = _samples(
        metrics,
        "cortex_evictions_total",
        "cortex_route_decisions_total",
        "cortex_prompt_cache_reused_tokens",
    )
    decisions = {
        k: int(counters.get(("cortex_route_decisions_total", frozenset({("kind", k)})), 0))
        for k in kinds
    }
    return Result(
        policy=policy,
        outcomes=outcomes,
        samples=samples,
        cold_loads=sum(1 for _, what, _ in logs if what == "load"),
        evictions=int(
            sum(v for (name, _), v in counters.items() if name == "cortex_evictions_total")
        ),
        scale_ins=decisions["scale_in"],
        thrash=thrash_count(logs, config.routing.thrash_window),
        max_wait=max_wait,
        duration=duration,
        decisions=decisions,
        refused=sum(1 for _, what, _ in logs if what == "refused"),
        affinity=attrs.asdict(router.affinity.statistics()),
        dropped_tokens=sum(s.dropped_tokens for s in sims.values()),
        follow_ups=attrs.asdict(router.follow_ups.statistics()),
        agent_unloads=sum(1 for _, what, m in logs if what == "unload" and m in agent_models),
        reported_cached_tokens=int(
            sum(
                v
                for (name, _), v in counters.items()
                if name == "cortex_prompt_cache_reused_tokens"
            )
        ),
    )


@contextlib.contextmanager
def seeded_scheduling(seed: int) -> Iterator[bool]:
    """trio's scheduler, deterministic for ``seed``, for one ``trio.run`` inside.

    trio runs the tasks ready at one moment in a random order from a
    generator of its own, and orders equal deadlines by object address.
    Sorting each batch by task number, then shuffling it with that
    generator seeded (what pytest-trio does under Hypothesis), makes the
    order depend on the seed alone. Yields False, changing nothing, on a
    trio without these internals: the replay then varies run to run.
    """
    run = getattr(getattr(trio, "_core", None), "_run", None)
    rng = getattr(run, "_r", None)
    if not isinstance(rng, random.Random) or not hasattr(run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
        yield False
        return
    saved, flag = rng.getstate(), run._ALLOW_DETERMINISTIC_SCHEDULING  # type: ignore[union-attr]
    rng.seed(seed)
    run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[union-attr]
    try:
        yield True
    finally:
        rng.setstate(saved)
        run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[union-attr]


def replay(
    fleet: FleetFile,
    trace: list[TraceRequest],
    policy: str,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> Result:
    """:func:`run_replay` in a ``trio.run`` of its own, in virtual time, for ``seed``.

    The same seed gives the same result; other seeds show the spread that
    task order alone causes (:func:`cortex.sim.report.summarise`).
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    with seeded_scheduling(seed):
        result = trio.run(partial(run_replay, fleet, trace, policy, **kwargs), clock=clock)
    result.seed = seed
    return result
