"""``GET /fleet``: the whole fleet as this gateway sees it, for ``cortex status``.

One JSON document: neurons (up/down, devices with memory and utilisation
(null for a neuron never reached),
host memory budget, work in flight), models (where loaded or loading, pinned
where (a model this gateway never had in its catalogue: wherever it is,
since it is never evicted; one a reload retired is pinned nowhere), in
flight, last used, ``stalled_secs`` (how long its engine has had requests
without making progress, as its neuron last said), and ``error``: why its
catalogue entry cannot be served, once a neuron refused it as a bad request or
when it fits on no neuron of the fleet)
and aliases. A model outside the catalogue that no neuron holds (a failed
load's record) is not listed.
Built from the pollers' state and the gateway's own counts; no neuron is
asked anything.
"""

from __future__ import annotations

from typing import Any

from cortex.gateway.state import LOADING, FleetState, NeuronState, fits_nowhere

#: A model on a neuron that is down: what it last reported is no longer known.
UNREACHABLE = "unreachable"
#: A loaded model past ``stall_timeout`` without progress: routed nothing there.
STALLED = "stalled"


def location_status(state: FleetState, neuron: NeuronState, model_id: str) -> str | None:
    """What ``neuron`` holds of ``model_id`` as shown to operators; None: nothing.

    A neuron that is down serves nothing, whatever its last poll said; a
    model stalled there shows as such.
    """
    status = neuron.status_of(model_id)
    if status is None and (neuron.name, model_id) in state.pending:
        status = LOADING
    if status is not None and not neuron.up:
        return UNREACHABLE
    if model_id in neuron.stalled:
        return STALLED
    return status


def _devices(neuron: NeuronState) -> list[dict[str, Any]] | None:
    """The neuron's devices with their last samples; None: never reached, nothing known."""
    if neuron.discovery is None:
        return None  # not [], a host without GPUs
    samples = {s.index: s for s in neuron.health.devices} if neuron.health else {}
    devices = []
    for device in neuron.discovery.devices:
        sample = samples.get(device.index)
        devices.append(
            {
                "index": device.index,
                "name": device.name,
                "vram_total_mb": device.vram_total_mb,
                "vram_used_mb": sample.vram_used_mb if sample else None,
                "vram_free_mb": sample.vram_free_mb if sample else None,
                "utilization_pct": sample.utilization_pct if sample else None,
                "temp_c": sample.temp_c if sample else None,
            }
        )
    return devices


def _neuron(neuron: NeuronState) -> dict[str, Any]:
    health = neuron.health
    return {
        "name": neuron.name,
        "endpoint": neuron.endpoint,
        "up": neuron.up,
        "suspect": neuron.suspect,
        "draining": neuron.draining,
        "last_seen": neuron.last_seen,
        "error": neuron.last_error,
        "hostname": neuron.discovery.hostname if neuron.discovery else None,
        "devices": _devices(neuron),
        "memory": None
        if health is None
        else {
            "total_mb": health.memory.total_mb,
            "used_mb": health.memory.used_mb,
            "free_mb": health.memory.free_mb,
        },
        # A neuron that is down has no work we know of: None, not its last figures.
        "in_flight": None if not neuron.up else health.in_flight if health else 0,
        "queue_depth": None if not neuron.up else health.queue_depth if health else 0,
    }


def fleet_view(state: FleetState) -> dict[str, Any]:
    catalogue = state.catalogue.models
    ids = list(catalogue)
    for neuron in state.neurons.values():
        ids += [m for m in neuron.models if m not in ids and state.holds(neuron, m)]
    models = []
    for model_id in ids:
        entry = catalogue.get(model_id)
        locations = []
        for neuron in state.neurons.values():
            status = location_status(state, neuron, model_id)
            if status is None:
                continue
            known = neuron.models.get(model_id)
            locations.append(
                {
                    "neuron": neuron.name,
                    "status": status,
                    "memory_mb": known.memory_mb if known else None,
                    # Down: only this gateway's own requests, still failing over.
                    "in_flight": neuron.busy(model_id)
                    if neuron.up
                    else neuron.in_flight.get(model_id, 0),
                    "last_used": neuron.recency(model_id) or None,
                    "stalled_secs": known.stalled_secs if known else 0.0,
                    "error": known.error if known else None,
                }
            )
        models.append(
            {
                "id": model_id,
                "in_catalogue": entry is not None,
                "retired": state.retired(model_id),
                # One this gateway never had is never evicted: as good as
                # pinned wherever it is.
                "pinned_on": list(entry.pinned_on)
                if entry
                else []
                if state.retired(model_id)
                else [
                    loc["neuron"]
                    for loc in locations
                    if state.holds(state.neurons[loc["neuron"]], model_id)
                ],
                "priority": entry.priority if entry else 0,
                "vram_mb": entry.vram_mb if entry else None,
                "locations": locations,
                # Why it cannot be served: a neuron refused its entry, or it fits nowhere.
                "error": state.invalid(model_id)
                or (fits_nowhere(entry, state.neurons.values()) if entry else None),
            }
        )
    return {
        "neurons": [_neuron(n) for n in state.neurons.values()],
        "models": models,
        "aliases": dict(state.catalogue.aliases),
        "tiers": {tier: list(members) for tier, members in state.catalogue.tiers.items()},
    }
