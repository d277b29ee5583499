"""Routing: from a model name to a neuron that has the model loaded.

For each request the router asks ``scheduler.decide``, a pure function of
the fleet state, for the policy's choice among the options open now
(``scheduler.Option``):

- ``loaded``: a replica on a routable neuron (up, not suspect);
- ``loading``: a load already under way (this gateway's, or one the neuron
  reports): wait for it;
- ``cold``: a load on a neuron where the catalogue's placement fits the
  discovered devices and free memory;
- ``evict``: a load there after unloading what ``evictor.plan`` chooses;

each with a predicted time to first token (``[routing] policy``, see
``cortex.gateway.scheduler``). When none is open the request waits in the
gateway's queue for this model, bounded in length and time, until the fleet
changes (a load ends, a request ends, a poll) and it decides again; or,
under a policy that does not wait, it gets a 503 at once.

The router acts on nothing itself: a decision that needs a load goes to
the ``Loader`` (``cortex.gateway.loader``), which runs it, its evictions and
later the scale-in of an added replica in its own nursery. The
``Preloader`` (``cortex.gateway.preload``) starts the loads of pinned
models where they are pinned, before each decision too: a request for one
whose preload is under way joins it. Each (neuron,
model) has at most one load in progress; every request that wants it waits
on its ``done`` Event, so two requests for one cold model cause one load.
The router keeps the names (aliases, tiers, metrics labels), the requests
in flight and waiting, and what it learns from them
(``scheduler.Observations``): the simulation runs this very code. A
request whose answer called a tool (``release(follows=True)``) leaves a
follow-up expected (``scheduler.FollowUps``) that keeps its model until the
next request of its conversation arrives.
"""

from __future__ import annotations

import collections
import math

import attrs
import trio

from cortex.config import GatewayConfig
from cortex.errors import (
    CortexError,
    ModelNotFound,
    NeuronUnreachable,
    Unavailable,
)
from cortex.gateway.affinity import Affinity, Prompt
from cortex.gateway.loader import Loader
from cortex.gateway.metrics import UNKNOWN, GatewayMetrics
from cortex.gateway.preload import Preloader
from cortex.gateway.scheduler import (
    Decision,
    FollowUps,
    Observations,
    Policy,
    PolicyFactory,
    Predictor,
    Request,
    ThrashLog,
    Ticket,
    WaitQueue,
    decide,
    make_policy,
    slots_of,
)
from cortex.gateway.scheduler.follow_ups import RESULTS as FOLLOW_UP_RESULTS
from cortex.gateway.state import (
    LOADED,
    FleetState,
    NeuronState,
)
from cortex.gateway.upstream import NeuronLink


@attrs.frozen
class _Routed:
    """A request in flight: when it was routed, and what was predicted for it."""

    at: float
    kind: str
    predicted: float
    #: The policy held it back (patience) before routing it.
    held: bool = False
    #: Routed to a free slot: the prompt tokens it was expected to process
    #: there, and the seconds it had waited for the route (its first token
    #: then measures the prefill rate); else 0.
    prefill_tokens: float = 0.0
    waited: float = 0.0


@attrs.define(eq=False)
class Router:
    """Names to models, requests to routes: decides, waits, and hands loads to ``loader``."""

    config: GatewayConfig
    state: FleetState
    api: NeuronLink
    metrics: GatewayMetrics
    observations: Observations = attrs.field(factory=Observations)
    #: Builds the policy (``make_policy``: the ``[routing] policy``); the
    #: simulator's reference policies come in here.
    policy_factory: PolicyFactory = make_policy
    queue: WaitQueue = attrs.field(init=False)
    predictor: Predictor = attrs.field(init=False)
    policy: Policy = attrs.field(init=False)
    thrash: ThrashLog = attrs.field(init=False)
    affinity: Affinity = attrs.field(init=False)
    follow_ups: FollowUps = attrs.field(init=False)
    #: (neuron, model) -> its requests in flight, oldest first.
    _routed: dict[tuple[str, str], collections.deque[_Routed]] = attrs.field(
        factory=dict, init=False
    )
    #: Carries out the loads, evictions and scale-ins decided here.
    loader: Loader = attrs.field(init=False)
    #: Loads pinned models where they are pinned (``cortex.gateway.preload``).
    preloader: Preloader = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        routing = self.config.routing
        self.queue = WaitQueue(limit=routing.queue_limit)
        self.thrash = ThrashLog(window=routing.thrash_window, residency=routing.min_residency)
        self.follow_ups = FollowUps(
            self.observations, limit=routing.follow_up_limit, enabled=routing.follow_ups
        )
        self.predictor = Predictor(
            self.state,
            self.observations,
            horizon=routing.thrash_window,
            thrash=self.thrash,
            follow_ups=self.follow_ups,
        )
        self.policy = self.policy_factory(
            self.config, self.state, self.predictor, self.queue, self.thrash
        )
        self.affinity = Affinity(
            self.predictor,
            self.metrics,
            enabled=routing.affinity,
            weigh_caches=routing.weigh_caches,
            conversations=routing.conversations,
        )
        # Evictions weigh the prompt caches the affinity knows sessions by.
        self.predictor.caches = self.affinity.eviction_cost
        for result in FOLLOW_UP_RESULTS:
            self.metrics.follow_ups.labels(result)
        self.loader = Loader(
            config=self.config,
            state=self.state,
            api=self.api,
            metrics=self.metrics,
            observations=self.observations,
            predictor=self.predictor,
            thrash=self.thrash,
            affinity=self.affinity,
            policy=self.policy,
            queue=self.queue,
        )
        self.preloader = Preloader(config=self.config, state=self.state, loader=self.loader)

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

    def named(self, name: str, model_id: str) -> str:
        """``model_id`` as errors name it for a client that asked for ``name``.

        ``'tier/bad' (a tier, its member 'huge')``, ``'chat' (an alias of
        'smollm2')``, or the id alone where the client named it.
        """
        if name == model_id:
            return repr(model_id)
        if name in self.state.catalogue.tiers:
            return f"{name!r} (a tier, its member {model_id!r})"
        return f"{name!r} (an alias of {model_id!r})"

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
        self,
        model_id: str,
        *,
        exclude: set[str],
        prompt: Prompt | None = None,
        asked: str | None = None,
    ) -> NeuronState:
        """A neuron with ``model_id`` loaded, its request count already raised.

        The caller must call ``release`` once the request is over. Neurons
        named in ``exclude`` are skipped; neurons whose load of the model
        fails are added to it. ``prompt``: the request's, for session
        affinity (``cortex.gateway.affinity``). ``asked``: the name the
        client gave (an alias, a tier), which the errors name; None: ``model_id``.

        Raises:
          ModelNotFound: no neuron can ever serve it.
          Unavailable: none can now (all busy, down, the queue for the model
            is full, or the wait or the load timed out: under a policy that
            queues, no request waits here longer than ``max_wait``);
            Retry-After set.
          CortexError: the load failed everywhere it was tried (its error).
        """
        arrived = trio.current_time()
        named = self.named(asked, model_id) if asked is not None else None
        self.observations.record_arrival(model_id, arrived)
        self._follow_up(model_id, prompt, arrived)
        last_error: CortexError | None = None
        ticket: Ticket | None = None
        first: _Routed | None = None
        held = False
        try:
            with trio.move_on_after(self.config.gateway.load_timeout):
                await self.state.wait_polled()
                while True:
                    # A pinned neuron that came up since the last change gets
                    # its preload first: then this request joins it.
                    self.preloader.check()
                    decision = self._decide(model_id, exclude, last_error, arrived, prompt, named)
                    route = decision.route
                    now = trio.current_time()
                    if route is None:
                        held = held or decision.hold
                        ticket = ticket or self._enter_queue(model_id, arrived)
                        if not ticket.waiting:
                            self.metrics.route_decisions.labels("queued").inc()
                        if first is None and decision.slot:
                            first = _Routed(now, "queued", now - arrived + decision.expected)
                        ticket.wait_for("slot" if decision.slot else "room", decision.wants)
                        await self._wait_for_room(ticket, decision.recheck)
                        continue
                    if first is None:
                        kind = "scale_out" if decision.scale_out else route.kind
                        first = _Routed(now, kind, now - arrived + route.predicted)
                    if route.kind == "loaded":
                        neuron = route.neuron
                        tokens = 0.0
                        if neuron.busy(model_id) < slots_of(neuron, model_id):
                            tokens = self.affinity.uncached_tokens(model_id, prompt, neuron.name)
                        self.affinity.routed(model_id, prompt, neuron.name)
                        routed = attrs.evolve(
                            first, held=held, prefill_tokens=tokens, waited=now - arrived
                        )
                        return self._take(neuron, model_id, routed)
                    if ticket is None and self.policy.waits:
                        ticket = self._enter_queue(model_id, arrived)
                    if ticket is not None:
                        ticket.wait_for("load")
                    load = route.load or self.loader.start(decision, model_id)
                    load.add_waiter()
                    try:
                        # Under a policy that queues, max_wait bounds all of a
                        # request's time here, the load it waits on included
                        # (the load goes on for those who come later).
                        with trio.move_on_at(self._deadline(arrived)):
                            await load.done.wait()
                    finally:
                        load.drop_waiter()
                    if not load.done.is_set():
                        raise Unavailable(
                            f"{model_id!r} is still loading after "
                            f"{self.config.routing.max_wait:g} s",
                            retry_after=self._retry_after(model_id),
                        )
                    # Refused for want of memory the planning now knows of
                    # (``replan``): decide again, evicting there if need be.
                    if load.error is not None and not load.replan:
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
        follows: bool = False,
    ) -> None:
        """The request routed by ``acquire`` is over.

        The optional figures (time to first token since the request came,
        completion tokens and the seconds spent decoding them) sharpen the
        predictions; without them the router learns from how long requests
        hold their route. ``prompt``: the one given to ``acquire``; a
        caller that routes with a prompt must pass it here too (or to
        ``answering`` first), or its prompt processing stays counted
        against the neuron (``Affinity.pending``). ``follows``: its answer
        called a tool, so the client will send the conversation again with
        the result (``scheduler.follow_ups``): the model is kept for it.
        """
        self.affinity.answered(neuron.name, model_id, prompt)
        if follows:
            if self.follow_ups.expect(neuron.name, model_id, prompt, trio.current_time()):
                self.metrics.follow_ups.labels("expired").inc()  # the oldest, past the bound
            self.metrics.follow_ups_expected.set(self.follow_ups.statistics().pending)
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
                if done.prefill_tokens:
                    self.observations.record_prefill(
                        neuron.name, model_id, done.prefill_tokens, first_token_s - done.waited
                    )
        if self.queue.depth(model_id) or (self.queue.depth() and not neuron.busy(model_id)):
            # A slot of this model is free for its waiting requests; or,
            # with nothing in flight, the model may be evicted for others'.
            self.state.changed()

    def _follow_up(self, model_id: str, prompt: Prompt | None, now: float) -> None:
        """A request came at ``now``: the follow-up it answers (if any) goes, counted."""
        expired = self.follow_ups.expire(now)
        if expired:
            self.metrics.follow_ups.labels("expired").inc(expired)

        def loaded(name: str) -> bool:
            neuron = self.state.neurons.get(name)
            return neuron is not None and neuron.status_of(model_id) == LOADED

        result = self.follow_ups.arrived(model_id, prompt, now, loaded)
        if result is not None:
            self.metrics.follow_ups.labels(result).inc()
        if expired or result is not None:
            self.metrics.follow_ups_expected.set(self.follow_ups.statistics().pending)

    def forget(self, neuron: NeuronState, model_id: str) -> None:
        """The neuron said it does not have ``model_id``: stop routing there."""
        self.state.model_missing(neuron, model_id)

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
                f"the queue for {model_id!r} is full: {self.queue.depth(model_id)} waiting already",
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
            if n.serves(model_id)
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

    def _decide(
        self,
        model_id: str,
        exclude: set[str],
        last_error: CortexError | None,
        arrived: float,
        prompt: Prompt | None = None,
        named: str | None = None,
    ) -> Decision:
        """``scheduler.decide`` on this gateway's fleet state, now (no await).

        Raises:
          ModelNotFound, Unavailable, or ``last_error`` when waiting cannot help.
        """
        request = Request(model_id, arrived, frozenset(exclude), prompt, last_error, named)
        return decide(
            self.state,
            request,
            now=trio.current_time(),
            policy=self.policy,
            queue=self.queue,
            affinity=self.affinity,
        )
