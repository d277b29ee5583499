"""The decision: from one request and the fleet state to a route, a wait, or a refusal.

:func:`decide` is a pure function of what it is given: the fleet state
(neurons, the loads in progress, the catalogue), the gateway's wait queue,
the policy with its predictor and observations, the request's facts and the
time. It does no I/O, needs no trio (``now`` is an argument) and changes
nothing; the router acts on what it returns (takes a slot, joins or starts
a load through ``cortex.gateway.loader``, or waits in the queue), and the
simulation and the tests call it directly on a fleet state of their own.

Two reads are not arguments: the fleet state's ``clock`` (the wall clock
of the neurons' ``last_used``, a fixed function in tests and virtual time in
``cortex.sim``), and the affinity's LRU maps, which a lookup refreshes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from cortex.config import CatalogModel
from cortex.errors import CortexError, InvalidCatalogueEntry, ModelNotFound, Unavailable
from cortex.gateway import evictor
from cortex.gateway.scheduler.policies import Policy
from cortex.gateway.scheduler.predictor import Decision, Option
from cortex.gateway.scheduler.queue import WaitQueue
from cortex.gateway.state import (
    HOST,
    LOADED,
    LOADING,
    FleetState,
    NeuronState,
    feasible,
    fits_nowhere,
    place,
)

if TYPE_CHECKING:
    # affinity imports this package: a runtime import would be a cycle.
    from cortex.gateway.affinity import Affinity, Prompt


@attrs.frozen
class Request:
    """What a decision knows of one request."""

    model_id: str
    #: trio time it came.
    arrived: float
    #: Neurons not to route it to (they failed it, or their load of it did).
    exclude: frozenset[str] = frozenset()
    #: Its prompt, for session affinity; None: no affinity.
    prompt: Prompt | None = None
    #: The error of the last load it waited on, raised when waiting cannot help.
    last_error: CortexError | None = None
    #: The model as the errors name it: what the client asked for, and the
    #: member of a tier or the target of an alias where that differs; None:
    #: the model id.
    named: str | None = None


def options(
    state: FleetState,
    model_id: str,
    *,
    now: float,
    policy: Policy,
    queue: WaitQueue,
    exclude: frozenset[str] | set[str] = frozenset(),
    arrived: float,
    ahead: int | None = None,
) -> list[Option]:
    """Every way to serve ``model_id`` open at ``now``, with its predicted time to first token.

    ``arrived``: when the request came (an older waiter for room on a neuron
    keeps it out of there). ``ahead``: requests for it waiting for a slot
    before this one; given, the loads are left out when the policy settles
    on a loaded replica or a load in progress whatever they are (planning
    them is most of a decision's cost).
    """
    predictor = policy.predictor
    usable = [n for n in state.routable() if n.name not in exclude]
    found: list[Option] = []
    holding: set[str] = set()
    for neuron in usable:
        status = neuron.status_of(model_id)
        if neuron.serves(model_id):
            found.append(Option("loaded", neuron, predictor.replica_wait(neuron, model_id)))
        if status in (LOADED, LOADING):
            holding.add(neuron.name)
    for (name, pending_id), load in state.pending.items():
        neuron = state.neurons[name]
        if pending_id == model_id and name not in exclude and neuron.routable:
            predicted = predictor.loading(neuron, model_id, load, now)
            found.append(Option("loading", neuron, predicted, load=load))
            holding.add(name)
    # A load the neuron reports (activation at its start, another
    # gateway's load): the neuron loads each id once, so asking it to
    # load joins that load and answers when it is done.
    for neuron in usable:
        if neuron.status_of(model_id) == LOADING and (neuron.name, model_id) not in state.pending:
            predicted = predictor.loading(neuron, model_id, None, now)
            found.append(Option("loading", neuron, predicted))
    # Sized per neuron below (``FleetState.sized``): the fleet-wide size is not needed.
    model = state.catalogue.models.get(model_id)
    if (
        model is None
        or state.invalid(model_id) is not None
        or (ahead is not None and policy.settled(model_id, found, ahead))
    ):
        return found
    strategy = policy.config.eviction.strategy
    for neuron in usable:
        if neuron.name in holding or not policy.loads_on(neuron, model_id):
            continue
        # Sized with what this neuron said of it, if anything.
        here = state.sized(model, neuron)
        if not feasible(here, neuron):
            continue
        if policy.waits and queue.blocks(model_id, neuron.name, arrived):
            continue  # an older waiter is first in line for room here
        plan = evictor.plan(
            state,
            neuron,
            here,
            strategy,
            key=policy.victim_key(neuron, now),
            spare=policy.spare(neuron),
        )
        if plan is None:
            continue
        if plan.evictions:
            predicted, penalty = predictor.cold(neuron, model_id, plan, now)
            caches = sum(predictor.cache_cost(neuron, v, now) for v in plan.evictions)
            found.append(
                Option("evict", neuron, predicted, plan=plan, penalty=penalty, caches=caches)
            )
        else:
            found.append(Option("cold", neuron, predictor.load(neuron, model_id), plan=plan))
    return found


def decide(
    state: FleetState,
    request: Request,
    *,
    now: float,
    policy: Policy,
    queue: WaitQueue,
    affinity: Affinity | None = None,
) -> Decision:
    """The policy's choice for ``request`` at trio time ``now``.

    ``policy`` must be the one built over ``state`` (its predictor reads it
    too); ``queue``: the requests waiting at the gateway, ``request`` among
    them or not; ``affinity``: where prompts were sent (None: no affinity).

    Returns:
      A ``Decision`` with a route; or with none, and then either a slot to
      wait for (``slot``), a hold (``hold``), or the neurons to wait for
      room on (``wants``, never empty then).

    Raises:
      ModelNotFound: no neuron can ever serve the model.
      Unavailable: waiting cannot help now (the policy does not wait, or
        every model where it fits is pinned).
      InvalidCatalogueEntry: a neuron refused the model's catalogue entry
        as a bad request, and the catalogue has not been reloaded since.
      CortexError: ``request.last_error``, where waiting cannot help.
    """
    model_id, arrived = request.model_id, request.arrived
    line = queue.lines.get(model_id, [])
    first = min((t.arrived for t in line), default=arrived)
    waited = now - min(arrived, first)
    ahead = sum(1 for t in line if t.waiting == "slot" and t.arrived < arrived)
    found = options(
        state,
        model_id,
        now=now,
        policy=policy,
        queue=queue,
        exclude=request.exclude,
        arrived=arrived,
        ahead=ahead,
    )
    invalid = state.invalid(model_id)
    if invalid is not None and not found:
        # A neuron refused its entry as a bad request: loading it again
        # (evicting for it) would fail the same until a reload fixes it.
        raise InvalidCatalogueEntry(invalid)
    if affinity is not None:
        found = affinity.fold(model_id, request.prompt, found)
    decision = policy.choose(model_id, found, now, waited, ahead)
    if decision.route is not None or decision.slot or decision.hold:
        return decision
    last_error = request.last_error
    named = request.named or repr(model_id)
    entry = state.entry(model_id)
    if entry is None:
        if last_error is not None:
            raise last_error
        if state.known(model_id):
            raise Unavailable(
                f"no neuron that has {named} is available" + _out_of_reach(state, model_id)
            )
        raise ModelNotFound(f"model {named} does not exist", param="model")
    usable = [n for n in state.routable() if n.name not in request.exclude]
    candidates = [n for n in usable if feasible(entry, n)]
    if not candidates:
        raise last_error or no_candidate(state, entry, named)
    wants = frozenset(
        n.name
        for n in candidates
        if policy.loads_on(n, model_id) and evictor.fits_later(state, n, entry)
    )
    if not policy.waits or not wants:
        raise last_error or no_room(state, entry, candidates, policy, named)
    return attrs.evolve(decision, wants=wants)


def no_candidate(state: FleetState, entry: CatalogModel, named: str | None = None) -> CortexError:
    """The error for a model no routable neuron could hold: 503 if one may come back, else 404.

    ``named``: the model as the message names it (``Request.named``); None: its id.
    """
    reason = fits_nowhere(entry, state.neurons.values(), named)
    if reason is None:
        return Unavailable(
            f"no neuron that can load {named or repr(entry.id)} is available now"
            + _out_of_reach(state, entry.id)
        )
    return ModelNotFound(reason, param="model")


def no_room(
    state: FleetState,
    entry: CatalogModel,
    candidates: list[NeuronState],
    policy: Policy,
    named: str | None = None,
) -> Unavailable:
    """The 503 for a model that fits on ``candidates`` but can be loaded on none of them now.

    The message says why, neuron by neuron: the model is there but stalled
    or being unloaded; it would not fit even once every model that may be
    evicted there is gone (what it needs, the most that could be free, the
    models that stay); the routing policy loads it elsewhere; or the models
    that could make room are busy (the policy does not wait for them).
    Then the neurons that have it but take nothing new (down, draining).
    """
    reasons = [(n.name, _no_room_on(state, n, entry, policy)) for n in candidates]
    if len(reasons) == 1:
        why = reasons[0][1]
    else:
        why = "; ".join(f"on {name}, {reason}" for name, reason in reasons)
    return Unavailable(
        f"no room for {named or repr(entry.id)} on {', '.join(n.name for n in candidates)} "
        f"now: {why}" + _out_of_reach(state, entry.id)
    )


def _no_room_on(state: FleetState, neuron: NeuronState, entry: CatalogModel, policy: Policy) -> str:
    model_id = entry.id
    if state.holds(neuron, model_id):
        if model_id in neuron.stalled:
            return "it is stalled there"
        if model_id in neuron.evicting:
            return "it is being unloaded there"
        return "it is there but takes no new requests now"
    room = evictor.room_later(state, neuron)
    if room is None:
        return "its memory is not known yet"
    if place(entry, room.free) is None:
        if neuron.is_gpu:
            need = f"{entry.vram_mb} MiB" + (
                f" over at least {entry.min_devices} devices" if entry.min_devices > 1 else ""
            )
            most = ", ".join(
                f"{max(0, mb)} MiB on device {i}" for i, mb in sorted(room.free.items())
            )
        else:
            need, most = f"{entry.vram_mb} MiB", f"{max(0, room.free[HOST])} MiB"
        stays = []
        if room.pinned:
            stays.append(f"pinned there: {_names(room.pinned)}")
        if room.foreign:
            stays.append(f"not this gateway's to load back: {_names(room.foreign)}")
        return (
            f"it needs {need}, and at most {most} could be free there "
            "after evicting every model that may be evicted"
            + (f" ({'; '.join(stays)})" if stays else "")
        )
    if not policy.loads_on(neuron, model_id):
        return "the routing policy loads it on another neuron"
    strategy = policy.config.eviction.strategy
    evictable = evictor.candidates(state, neuron, strategy, spare=policy.spare(neuron))
    busy = [
        m
        for m in neuron.models
        if m not in evictable
        and m not in room.pinned
        and m not in room.foreign
        and state.holds(neuron, m)
    ]
    if not busy:
        return "the loads under way there take the room"
    return (
        f"the models that could make room are busy ({_names(busy)}: requests in flight "
        "or waiting, or a load or unload under way)"
    )


def _out_of_reach(state: FleetState, model_id: str) -> str:
    """``: N, where it is loaded, is down`` for each neuron that has it but takes nothing new."""
    found = []
    for neuron in state.neurons.values():
        if neuron.routable or not state.holds(neuron, model_id):
            continue
        if not neuron.up:
            why = "down"
        elif neuron.draining:
            why = "draining"
        else:
            why = "suspect (a request to it failed; it is polled again now)"
        status = LOADED if neuron.status_of(model_id) == LOADED else LOADING
        found.append(f"{neuron.name}, where it is {status}, is {why}")
    return "; " + "; ".join(found) if found else ""


def _names(model_ids: list[str]) -> str:
    return ", ".join(repr(m) for m in model_ids)


@attrs.frozen
class ScaleIn:
    """What to do now with a replica added to scale out (``scale_in``)."""

    #: Unload it now.
    unload: bool = False
    #: Else, seconds after which to look again; None: stop, it is gone or going.
    recheck: float | None = None


def scale_in(
    state: FleetState, queue: WaitQueue, neuron: NeuronState, model_id: str, idle_limit: float
) -> ScaleIn:
    """Whether the replica of ``model_id`` added on ``neuron`` goes now.

    It goes once it has idled ``idle_limit`` seconds with nothing of it in
    flight or waiting, while another replica is loaded; nobody watches it
    any longer once it is gone or being unloaded, whoever unloads it, or
    once it is pinned there (a reload may pin it): a pinned model stays.
    """
    status = neuron.models.get(model_id)
    if (
        status is None
        or status.status != LOADED
        or model_id in neuron.evicting
        or state.pinned(neuron, model_id)
    ):
        return ScaleIn()
    idle = state.clock() - neuron.recency(model_id)
    others = any(n is not neuron and n.serves(model_id) for n in state.routable())
    quiet = not neuron.busy(model_id) and not queue.depth(model_id)
    if others and quiet and idle >= idle_limit:
        return ScaleIn(unload=True)
    return ScaleIn(recheck=max(1.0, idle_limit - idle) if quiet else idle_limit)
