"""Routing: from a model name to a neuron that has the model loaded.

For each request the router lists its options (``scheduler.Option``):

- ``loaded``: a replica on a routable neuron (up, not suspect);
- ``loading``: a load already under way (this gateway's, or one the neuron
  reports): wait for it;
- ``cold``: a load on a neuron where the catalogue's placement fits the
  discovered devices and free memory;
- ``evict``: a load there after unloading what ``evictor.plan`` chooses;

each with a predicted time to first token, and the policy
(``[routing] policy``, see ``cortex.gateway.scheduler``) takes one. When none
is open the request waits in the gateway's queue for this model, bounded in
length and time, until the fleet changes (a load ends, a request ends, a
poll) and it decides again; or, under a policy that does not wait, it gets a
503 at once.

A load runs as a task in the gateway's nursery, not in the request that
started it: when that client goes away the load still finishes for the
others waiting on it. Each (neuron, model) has at most one load in
progress; every request that wants it waits on its ``done`` Event, so two
requests for one cold model cause one load. A replica added to scale out
gets a task of its own that unloads it once it has been idle long enough.

The router acts on neurons only through ``NeuronLink`` (HTTP in the
gateway, in process in ``cortex.sim``) and learns from what it sees there
(``scheduler.Observations``): the simulation runs this very code.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any

import attrs
import trio

from cortex.config import CatalogModel, GatewayConfig
from cortex.errors import (
    CortexError,
    ModelNotFound,
    NeuronUnreachable,
    RequestError,
    Unavailable,
    UpstreamError,
)
from cortex.fleet import ModelStatus
from cortex.gateway import evictor
from cortex.gateway.affinity import Affinity, Prompt
from cortex.gateway.metrics import UNKNOWN, GatewayMetrics
from cortex.gateway.poller import refresh
from cortex.gateway.scheduler import (
    Decision,
    Observations,
    Option,
    Policy,
    Predictor,
    ThrashLog,
    Ticket,
    WaitQueue,
    make_policy,
)
from cortex.gateway.state import (
    LOADED,
    LOADING,
    FleetState,
    NeuronState,
    PendingLoad,
    feasible,
    reservation,
)
from cortex.gateway.upstream import NeuronLink

log = logging.getLogger(__name__)


@attrs.frozen
class _Routed:
    """A request in flight: when it was routed, and what was predicted for it."""

    at: float
    kind: str
    predicted: float
    #: The policy held it back (patience) before routing it.
    held: bool = False


@attrs.define(eq=False)
class Router:
    config: GatewayConfig
    state: FleetState
    api: NeuronLink
    metrics: GatewayMetrics
    observations: Observations = attrs.field(factory=Observations)
    queue: WaitQueue = attrs.field(init=False)
    predictor: Predictor = attrs.field(init=False)
    policy: Policy = attrs.field(init=False)
    thrash: ThrashLog = attrs.field(init=False)
    affinity: Affinity = attrs.field(init=False)
    #: (neuron, model) -> its requests in flight, oldest first.
    _routed: dict[tuple[str, str], collections.deque[_Routed]] = attrs.field(
        factory=dict, init=False
    )
    #: Owns the loads, evictions and scale-ins; open while ``run`` runs.
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        routing = self.config.routing
        self.queue = WaitQueue(limit=routing.queue_limit)
        self.thrash = ThrashLog(window=routing.thrash_window, residency=routing.min_residency)
        self.predictor = Predictor(
            self.state, self.observations, horizon=routing.thrash_window, thrash=self.thrash
        )
        self.policy = make_policy(self.config, self.state, self.predictor, self.queue, self.thrash)
        self.affinity = Affinity(self.predictor, self.metrics)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loads, evictions and scale-ins that routes start, until cancelled.

        Start it with ``await nursery.start(router.run)`` before any request
        arrives: ``acquire`` needs it running to start a load.

        Cancellation:
          Cancels every load, eviction and scale-in under way.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- names ----------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The concrete model id for ``name``; for a tier, the member to route to.

        Raises:
          ModelNotFound: neither an alias, a tier, a catalogue model, nor loaded anywhere.
        """
        members = self.state.catalogue.tiers.get(name)
        if members:
            return self.policy.pick_member(members)
        model_id = self.state.catalogue.resolve(name)
        if not self.state.known(model_id):
            raise ModelNotFound(f"model {name!r} does not exist", param="model")
        return model_id

    def label(self, name: str | None) -> str:
        """The metrics label for a requested model name."""
        if not name:
            return UNKNOWN
        if name in self.state.catalogue.tiers:
            return name
        model_id = self.state.catalogue.resolve(name)
        return model_id if self.state.known(model_id) else UNKNOWN

    # -- routes ---------------------------------------------------------------

    async def acquire(
        self, model_id: str, *, exclude: set[str], prompt: Prompt | None = None
    ) -> NeuronState:
        """A neuron with ``model_id`` loaded, its request count already raised.

        The caller must call ``release`` once the request is over. Neurons
        named in ``exclude`` are skipped; neurons whose load of the model
        fails are added to it. ``prompt``: the request's, for session
        affinity (``cortex.gateway.affinity``).

        Raises:
          ModelNotFound: no neuron can ever serve it.
          Unavailable: none can now (all busy, down, the queue for the model
            is full, or the wait or the load timed out: under a policy that
            queues, no request waits here longer than ``max_wait``);
            Retry-After set.
          CortexError: the load failed everywhere it was tried (its error).
        """
        arrived = trio.current_time()
        self.observations.record_arrival(model_id, arrived)
        last_error: CortexError | None = None
        ticket: Ticket | None = None
        first: _Routed | None = None
        held = False
        try:
            with trio.move_on_after(self.config.gateway.load_timeout):
                await self.state.wait_polled()
                while True:
                    decision, wants = self._decide(model_id, exclude, last_error, arrived, prompt)
                    route = decision.route
                    now = trio.current_time()
                    if route is None:
                        held = held or decision.hold
                        ticket = ticket or self._enter_queue(model_id, arrived)
                        if not ticket.waiting:
                            self.metrics.route_decisions.labels("queued").inc()
                        if first is None and decision.slot:
                            first = _Routed(now, "queued", now - arrived + decision.expected)
                        ticket.waiting = "slot" if decision.slot else "room"
                        ticket.wants = wants
                        await self._wait_for_room(ticket, decision.recheck)
                        continue
                    if first is None:
                        kind = "scale_out" if decision.scale_out else route.kind
                        first = _Routed(now, kind, now - arrived + route.predicted)
                    if route.kind == "loaded":
                        self.affinity.routed(model_id, prompt, route.neuron.name)
                        return self._take(route.neuron, model_id, attrs.evolve(first, held=held))
                    if ticket is None and self.policy.waits:
                        ticket = self._enter_queue(model_id, arrived)
                    if ticket is not None:
                        ticket.waiting, ticket.wants = "load", frozenset()
                    load = route.load or self._start(route, model_id, decision)
                    load.waiters += 1
                    try:
                        # Under a policy that queues, max_wait bounds all of a
                        # request's time here, the load it waits on included
                        # (the load goes on for those who come later).
                        with trio.move_on_at(self._deadline(arrived)):
                            await load.done.wait()
                    finally:
                        load.waiters -= 1
                    if not load.done.is_set():
                        raise Unavailable(
                            f"{model_id!r} is still loading after "
                            f"{self.config.routing.max_wait:g} s",
                            retry_after=self._retry_after(model_id),
                        )
                    if load.error is not None:
                        exclude.add(load.neuron)
                        # A neuron that could not be reached says nothing of
                        # the model: decide again as if it were not there.
                        if not isinstance(load.error, NeuronUnreachable):
                            last_error = load.error
            raise Unavailable(f"timed out waiting for {model_id!r} to load")
        except CortexError:
            self.metrics.route_decisions.labels("rejected").inc()
            raise
        finally:
            if ticket is not None:
                self._leave_queue(ticket)

    def answering(self, neuron: NeuronState, model_id: str, prompt: Prompt | None) -> None:
        """The request ``prompt`` was routed with got its first byte: its prompt is processed."""
        self.affinity.answered(neuron.name, model_id, prompt)

    def release(
        self,
        neuron: NeuronState,
        model_id: str,
        *,
        first_token_s: float | None = None,
        completion_tokens: int | None = None,
        decode_s: float | None = None,
        prompt: Prompt | None = None,
    ) -> None:
        """The request routed by ``acquire`` is over.

        The optional figures (time to first token since the request came,
        completion tokens and the seconds spent decoding them) sharpen the
        predictions; without them the router learns from how long requests
        hold their route. ``prompt``: the one given to ``acquire``; a
        caller that routes with a prompt must pass it here too (or to
        ``answering`` first), or its prompt processing stays counted
        against the neuron (``Affinity.pending``).
        """
        self.affinity.answered(neuron.name, model_id, prompt)
        neuron.end_request(model_id, now=self.state.clock())
        self.metrics.in_flight.labels(model_id, neuron.name).dec()
        routed = self._routed.get((neuron.name, model_id))
        if routed:
            # Requests end in any order: pairing each end with the oldest
            # start keeps the sum (so the mean) of the durations exact.
            done = routed.popleft()
            self.observations.record_request(
                neuron.name,
                model_id,
                trio.current_time() - done.at,
                completion_tokens=completion_tokens,
                decode_s=decode_s,
            )
            if first_token_s is not None:
                self.metrics.observed_ttft.labels(done.kind).observe(first_token_s)
                if not done.held:
                    # What requests wait anyway: patience may hold others that
                    # long. (Paired oldest-first, a flag may now and then go
                    # to a neighbour of its request: close enough for a tail.)
                    self.observations.record_first_token(first_token_s)
        if self.queue.depth(model_id) or (self.queue.depth() and not neuron.busy(model_id)):
            # A slot of this model is free for its waiting requests; or,
            # with nothing in flight, the model may be evicted for others'.
            self.state.changed()

    def forget(self, neuron: NeuronState, model_id: str) -> None:
        """The neuron said it does not have ``model_id``: stop routing there."""
        if model_id in neuron.models:
            neuron.model_gone(model_id)
            neuron.poke.set()
            self.state.changed()

    def _take(self, neuron: NeuronState, model_id: str, routed: _Routed) -> NeuronState:
        neuron.begin_request(model_id, now=self.state.clock())
        self.metrics.in_flight.labels(model_id, neuron.name).inc()
        self.metrics.route_decisions.labels(routed.kind).inc()
        self.metrics.predicted_ttft.labels(routed.kind).observe(routed.predicted)
        self._routed.setdefault((neuron.name, model_id), collections.deque()).append(
            attrs.evolve(routed, at=trio.current_time())
        )
        return neuron

    # -- the queue ------------------------------------------------------------

    def _enter_queue(self, model_id: str, arrived: float) -> Ticket:
        if self.queue.full(model_id):
            raise Unavailable(
                f"{self.queue.depth(model_id)} requests for {model_id!r} are waiting already",
                retry_after=self._retry_after(model_id),
            )
        ticket = self.queue.enter(model_id, arrived)
        self.metrics.gateway_queue.labels(model_id).set(self.queue.depth(model_id))
        return ticket

    def _leave_queue(self, ticket: Ticket) -> None:
        self.queue.leave(ticket)
        self.metrics.gateway_queue.labels(ticket.model_id).set(self.queue.depth(ticket.model_id))
        self.metrics.queue_wait.labels(ticket.model_id).observe(
            trio.current_time() - ticket.arrived
        )
        if ticket.wants and self.queue.depth():
            # Others may have stood back for this one: let them look again.
            self.state.changed()

    def _retry_after(self, model_id: str) -> int:
        """Seconds a refused client should wait: how long the line ahead should take."""
        waits = [
            self.predictor.replica_wait(n, model_id)
            for n in self.state.routable()
            if n.status_of(model_id) == LOADED
        ]
        guess = min(waits) if waits else self.config.routing.max_wait / 10
        return max(1, min(60, math.ceil(guess)))

    def _deadline(self, arrived: float) -> float:
        """When a request that came at ``arrived`` stops waiting at the gateway."""
        return arrived + self.config.routing.max_wait if self.policy.waits else math.inf

    async def _wait_for_room(self, ticket: Ticket, recheck: float) -> None:
        """Wait for the fleet to change, or ``recheck`` seconds, or until the ticket's time is up.

        Raises:
          Unavailable: it has waited ``max_wait`` already.
        """
        max_wait = self.config.routing.max_wait
        left = ticket.arrived + max_wait - trio.current_time()
        if left <= 0:
            raise Unavailable(
                f"no room for {ticket.model_id!r} within {max_wait:g} s",
                retry_after=self._retry_after(ticket.model_id),
            )
        with trio.move_on_after(min(left, max(recheck, 0.01))):
            await self.state.wait_changed()

    # -- decisions ------------------------------------------------------------

    def options(
        self, model_id: str, *, exclude: set[str], arrived: float, ahead: int | None = None
    ) -> list[Option]:
        """Every way to serve ``model_id`` open now, with its predicted time to first token.

        ``ahead``: requests for it waiting for a slot before this one; given,
        the loads are left out when the policy settles on a loaded replica
        or a load in progress whatever they are (planning them is most of a
        decision's cost).
        """
        now = trio.current_time()
        predictor, policy = self.predictor, self.policy
        usable = [n for n in self.state.routable() if n.name not in exclude]
        options: list[Option] = []
        holding: set[str] = set()
        for neuron in usable:
            status = neuron.status_of(model_id)
            if status == LOADED and model_id not in neuron.evicting:
                options.append(Option("loaded", neuron, predictor.replica_wait(neuron, model_id)))
            if status in (LOADED, LOADING):
                holding.add(neuron.name)
        for (name, pending_id), load in self.state.pending.items():
            neuron = self.state.neurons[name]
            if pending_id == model_id and name not in exclude and neuron.routable:
                predicted = predictor.loading(neuron, model_id, load, now)
                options.append(Option("loading", neuron, predicted, load=load))
                holding.add(name)
        # A load the neuron reports (activation at its start, another
        # gateway's load): the neuron loads each id once, so asking it to
        # load joins that load and answers when it is done.
        for neuron in usable:
            if neuron.status_of(model_id) == LOADING and (neuron.name, model_id) not in (
                self.state.pending
            ):
                predicted = predictor.loading(neuron, model_id, None, now)
                options.append(Option("loading", neuron, predicted))
        entry = self.state.catalogue.models.get(model_id)
        if entry is None or (ahead is not None and policy.settled(model_id, options, ahead)):
            return options
        strategy = self.config.eviction.strategy
        for neuron in usable:
            if (
                neuron.name in holding
                or not policy.loads_on(neuron, model_id)
                or not feasible(entry, neuron)
            ):
                continue
            if policy.waits and self.queue.blocks(model_id, neuron.name, arrived):
                continue  # an older waiter is first in line for room here
            plan = evictor.plan(
                self.state,
                neuron,
                entry,
                strategy,
                key=policy.victim_key(neuron),
                spare=policy.spare(neuron),
            )
            if plan is None:
                continue
            if plan.evictions:
                predicted, penalty = predictor.cold(neuron, model_id, plan)
                options.append(Option("evict", neuron, predicted, plan=plan, penalty=penalty))
            else:
                options.append(Option("cold", neuron, predictor.load(neuron, model_id), plan=plan))
        return options

    def _decide(
        self,
        model_id: str,
        exclude: set[str],
        last_error: CortexError | None,
        arrived: float,
        prompt: Prompt | None = None,
    ) -> tuple[Decision, frozenset[str]]:
        """The policy's choice, or None and the neurons to wait for room on (no await).

        Raises:
          ModelNotFound, Unavailable, or ``last_error`` when waiting cannot help.
        """
        now = trio.current_time()
        line = self.queue.lines.get(model_id, [])
        first = min((t.arrived for t in line), default=arrived)
        waited = now - min(arrived, first)
        ahead = sum(1 for t in line if t.waiting == "slot" and t.arrived < arrived)
        options = self.affinity.fold(
            model_id,
            prompt,
            self.options(model_id, exclude=exclude, arrived=arrived, ahead=ahead),
        )
        decision = self.policy.choose(model_id, options, now, waited, ahead)
        if decision.route is not None or decision.slot or decision.hold:
            return decision, frozenset()
        entry = self.state.catalogue.models.get(model_id)
        if entry is None:
            if last_error is not None:
                raise last_error
            if self.state.known(model_id):
                raise Unavailable(f"no neuron that has {model_id!r} is available")
            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
        usable = [n for n in self.state.routable() if n.name not in exclude]
        candidates = [n for n in usable if feasible(entry, n)]
        if not candidates:
            raise last_error or self._no_candidate(entry)
        wants = frozenset(
            n.name
            for n in candidates
            if self.policy.loads_on(n, model_id) and evictor.fits_later(self.state, n, entry)
        )
        if not self.policy.waits or not wants:
            raise last_error or Unavailable(
                f"no room for {model_id!r} on {', '.join(n.name for n in candidates)} now: "
                "the models there are pinned or busy"
            )
        return decision, wants

    # -- loads ----------------------------------------------------------------

    def _start(self, route: Option, model_id: str, decision: Decision) -> PendingLoad:
        """Start the load ``route`` stands for and return it (no await in here)."""
        entry = self.state.catalogue.models.get(model_id)
        neuron = route.neuron
        now = trio.current_time()
        if route.plan is None:
            load = PendingLoad(
                neuron=neuron.name,
                model_id=model_id,
                reserve_mb={},
                devices=[],
                evictions=[],
                joined=True,
                started=now,
            )
            return self._launch(load, entry)
        assert entry is not None
        plan = route.plan
        load = PendingLoad(
            neuron=neuron.name,
            model_id=model_id,
            reserve_mb=reservation(entry, plan.devices),
            devices=plan.devices,
            evictions=plan.evictions,
            started=now,
            replica=decision.scale_out,
        )
        return self._launch(load, entry)

    def _no_candidate(self, entry: CatalogModel) -> CortexError:
        neurons = list(self.state.neurons.values())
        if any(n.discovery is not None and feasible(entry, n) for n in neurons) or any(
            n.discovery is None for n in neurons
        ):
            return Unavailable(f"no neuron that can load {entry.id!r} is available now")
        return ModelNotFound(
            f"model {entry.id!r} fits on no neuron of the fleet "
            f"(needs {entry.vram_mb} MiB over at least {entry.min_devices} device(s))",
            param="model",
        )

    def _launch(self, load: PendingLoad, entry: CatalogModel | None) -> PendingLoad:
        assert self._nursery is not None, "start Router.run first"
        self.state.load_started(load)
        self._nursery.start_soon(self._run_load, load, entry)
        return load

    def _load_body(self, load: PendingLoad, entry: CatalogModel | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": load.model_id, "source": load.model_id}
        if entry is not None:
            body["source"] = entry.source or entry.id
            if entry.harness:
                body["harness"] = entry.harness
            if entry.chat_format:
                body["chat_format"] = entry.chat_format
            if entry.options:
                body["options"] = entry.options
        if load.devices:
            body["devices"] = load.devices
        return body

    async def _unload(self, neuron: NeuronState, model_id: str) -> None:
        try:
            await self.api.unload(neuron, model_id)
        except ModelNotFound:
            pass  # already gone: the room is there all the same
        neuron.model_gone(model_id)
        neuron.end_evicting([model_id])
        self.affinity.forget(neuron.name, model_id)

    async def _run_load(self, load: PendingLoad, entry: CatalogModel | None) -> None:
        """Evict, load, record; errors end up in ``load.error``, never raised."""
        neuron = self.state.neurons[load.neuron]
        start = trio.current_time()
        try:
            for victim in load.evictions:
                log.warning(
                    "evicting %s from %s to make room for %s", victim, neuron.name, load.model_id
                )
                await self._unload(neuron, victim)
                self.thrash.evicted(victim, trio.current_time())
                self.metrics.evictions.labels(victim, neuron.name).inc()
            if load.evictions:
                await self._refresh(neuron)
            if not load.joined:
                log.info("loading %s on %s", load.model_id, neuron.name)
            load_start = trio.current_time()
            status = await self.api.load(neuron, self._load_body(load, entry))
            if status is None or status.status != LOADED:
                status = ModelStatus(
                    id=load.model_id,
                    harness=entry.harness if entry else None,
                    status=LOADED,
                    memory_mb=entry.vram_mb if entry else 0,
                )
            neuron.model_loaded(load.model_id, status)
            elapsed = trio.current_time() - start
            if not load.joined:
                now = trio.current_time()
                self.observations.record_load(
                    neuron.name, load.model_id, self.predictor.size(load.model_id), now - load_start
                )
                self.metrics.cold_starts.labels(load.model_id, neuron.name).inc()
                self.metrics.load_seconds.labels(load.model_id, neuron.name).observe(elapsed)
                if self.thrash.loaded(load.model_id, now):
                    self.metrics.thrash.labels(load.model_id).inc()
                log.info("loaded %s on %s in %.1f s", load.model_id, neuron.name, elapsed)
                if load.replica and self.policy.scales_in:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._scale_in, neuron, load.model_id)
            await self._refresh(neuron)
        except trio.Cancelled:
            raise
        except CortexError as exc:
            if isinstance(exc, NeuronUnreachable):
                neuron.mark_suspect(exc.message)
            # A load refused as a bad request (no such source, bad options)
            # is the catalogue's fault, not the client's: a 502 for them.
            if isinstance(exc, RequestError):
                exc = UpstreamError(exc.message)
            exc.message = f"loading {load.model_id!r} on {neuron.name} failed: {exc.message}"
            load.error = exc
            log.warning("%s", exc.message)
        except Exception as exc:
            load.error = UpstreamError(f"loading {load.model_id!r} on {neuron.name} failed: {exc}")
            log.exception("loading %s on %s failed", load.model_id, neuron.name)
        finally:
            # In the same step as the refresh that shows the model (or its failure).
            self.state.load_finished(load)

    async def _refresh(self, neuron: NeuronState) -> None:
        try:
            await refresh(self.api, self.state, neuron)
        except CortexError:
            pass  # marked down by refresh; the router will look elsewhere

    async def _scale_in(self, neuron: NeuronState, model_id: str) -> None:
        """Unload a replica added to scale out once it has idled ``scale_in_idle`` seconds.

        Only while another replica is loaded; returns once it is gone,
        whoever unloaded it.
        """
        idle_limit = self.config.routing.scale_in_idle
        while True:
            status = neuron.models.get(model_id)
            if status is None or status.status != LOADED or model_id in neuron.evicting:
                return
            idle = self.state.clock() - neuron.recency(model_id)
            others = any(
                n is not neuron and n.status_of(model_id) == LOADED and model_id not in n.evicting
                for n in self.state.routable()
            )
            quiet = not neuron.busy(model_id) and not self.queue.depth(model_id)
            if others and quiet and idle >= idle_limit:
                log.info("unloading %s from %s: an extra replica, idle", model_id, neuron.name)
                neuron.begin_evicting([model_id])
                try:
                    await self._unload(neuron, model_id)
                except CortexError as exc:
                    log.warning("unloading %s from %s failed: %s", model_id, neuron.name, exc)
                finally:
                    neuron.end_evicting([model_id])
                self.metrics.route_decisions.labels("scale_in").inc()
                await self._refresh(neuron)
                self.state.changed()
                return
            await trio.sleep(max(1.0, idle_limit - idle) if quiet else idle_limit)
