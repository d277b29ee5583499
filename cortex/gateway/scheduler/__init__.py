"""Scheduling: what the router predicts, which route it takes, who waits.

For each request the router lists its :class:`Option` s, each with a
predicted time to first token: a loaded replica, a load in progress, a cold
load on a neuron with room, a cold load after evictions. Its :class:`Policy`
takes one. When none is open (memory held by busy models, the thrash guard,
an older waiter first in line) a policy that ``waits`` parks the request in
the :class:`WaitQueue` until something changes; the others answer 503.

Predictions (:class:`Predictor`) come from :class:`Observations`, what this
gateway measured: load seconds per model and neuron (else that neuron's load
throughput applied to the model's size, else a prior from the size), seconds
per request, decode tokens/s and prefill tokens/s per model and neuron, the time between a
model's requests; and the requests queued and in flight against the model's
slots, from the neurons' /models and the gateway's own counts.

Policies (``[routing] policy``):

- ``predictive``, the default: the option with the smallest predicted time
  to first token (with session affinity's prompt processing folded in: a
  saturated replica that holds the prompt is waited for when that takes
  under half the time of a free one without it). An eviction adds a penalty:
  the victim's reload time times the chance it is asked for again soon (from
  its recency and request rate), so models in use stay; plus, with session
  affinity, the prompt cache it holds for sessions still going on
  (``Affinity.eviction_cost``), which a request waits that many seconds
  before throwing away. A model with requests waiting at the gateway is not
  evicted, nor one that thrashed (reloaded within ``thrash_window`` of its
  eviction) in the ``min_residency`` seconds after that reload: the thrash
  guard; requests for others wait and are served together. A model whose
  answer called a tool (``follow_ups``) counts as certain to return until
  the tool's result comes, or the learned window (``follow_up_limit`` at
  most) passes: its whole reload and prompt caches weigh, and it is evicted
  last. With
  ``patience``, a request waits before an eviction that its penalty times
  ``patience`` is more than it has waited, never so long that its first
  token would come later than ``patience_limit`` (by default: the slowest 1%
  of the requests it did not hold; ``patience_tail`` sets the percentile); a
  request held so claims no room, and others take what frees meanwhile. When
  the predicted wait on a model's replicas has stayed above
  ``scale_out_wait`` for ``scale_out_after`` seconds and a neuron has room
  (or only stale models to evict), a further replica is loaded; it goes
  again after ``scale_in_idle`` seconds idle. - ``fixed``: loaded > loading
  > cold load, evicting by [eviction] strategy: the order LocalAI and most
  gateways use. No queue: 503 when nothing fits. - ``static``: every model
  has one home neuron (llama-swap's groups) where it is swapped in on
  demand, evicting the least recently used; requests wait for busy models to
  finish.

Everything here is synchronous: the router calls it between awaits.
:func:`decide` is the whole decision for one request, a pure function of
the fleet state, the queue, the policy and the time: the router, the
simulation and the tests call it alike.

The parts: ``observations`` (priors and measurements), ``predictor``
(options, decisions, predictions), ``queue`` (who waits), ``thrash`` (the
thrash guard), ``follow_ups`` (answers that called a tool, their results
expected), ``policies`` (who picks), ``decide`` (the options open to a
request and the policy's choice among them).
"""

from cortex.gateway.scheduler.decide import (
    Request,
    ScaleIn,
    decide,
    no_candidate,
    options,
    scale_in,
)
from cortex.gateway.scheduler.follow_ups import (
    MATCH_SHARE,
    FollowUp,
    FollowUps,
    FollowUpStatistics,
    least_shared,
)
from cortex.gateway.scheduler.observations import (
    ALPHA,
    FIRST_TOKEN_ENOUGH,
    FIRST_TOKEN_WINDOW,
    FOLLOW_UP_ENOUGH,
    FOLLOW_UP_PERCENTILE,
    FOLLOW_UP_SAMPLES,
    GUARD_FACTOR,
    LOAD_OVERHEAD_S,
    PATIENCE_LIMIT_FLOOR,
    PREFILL_ENOUGH,
    PREFILL_SAMPLE_TOKENS,
    PRIOR_COMPLETION_TOKENS,
    PRIOR_DECODE,
    PRIOR_FOLLOW_UP_S,
    PRIOR_LOAD_MBPS,
    REPLICA_PENALTY,
    RETURN_HORIZON,
    SESSION_GAP,
    UNKNOWN_SIZE_MB,
    UNLOAD_S,
    Ewma,
    Observations,
)
from cortex.gateway.scheduler.policies import (
    POLICIES,
    FixedPolicy,
    Policy,
    PolicyFactory,
    PredictivePolicy,
    StaticPolicy,
    make_policy,
)
from cortex.gateway.scheduler.predictor import (
    CacheCost,
    Decision,
    Kind,
    Option,
    Predictor,
    slots_of,
)
from cortex.gateway.scheduler.queue import QueueStatistics, Ticket, WaitQueue
from cortex.gateway.scheduler.thrash import ThrashLog

__all__ = [
    "ALPHA",
    "FIRST_TOKEN_ENOUGH",
    "FIRST_TOKEN_WINDOW",
    "FOLLOW_UP_ENOUGH",
    "FOLLOW_UP_PERCENTILE",
    "FOLLOW_UP_SAMPLES",
    "GUARD_FACTOR",
    "LOAD_OVERHEAD_S",
    "MATCH_SHARE",
    "PATIENCE_LIMIT_FLOOR",
    "POLICIES",
    "PREFILL_ENOUGH",
    "PREFILL_SAMPLE_TOKENS",
    "PRIOR_COMPLETION_TOKENS",
    "PRIOR_DECODE",
    "PRIOR_FOLLOW_UP_S",
    "PRIOR_LOAD_MBPS",
    "REPLICA_PENALTY",
    "RETURN_HORIZON",
    "SESSION_GAP",
    "UNKNOWN_SIZE_MB",
    "UNLOAD_S",
    "CacheCost",
    "Decision",
    "Ewma",
    "FixedPolicy",
    "FollowUp",
    "FollowUpStatistics",
    "FollowUps",
    "Kind",
    "Observations",
    "Option",
    "Policy",
    "PolicyFactory",
    "PredictivePolicy",
    "Predictor",
    "QueueStatistics",
    "Request",
    "ScaleIn",
    "StaticPolicy",
    "ThrashLog",
    "Ticket",
    "WaitQueue",
    "decide",
    "least_shared",
    "make_policy",
    "no_candidate",
    "options",
    "scale_in",
    "slots_of",
]
