"""Trace replay: the gateway's own router against fake neurons in virtual time.

``python -m cortex.sim --fleet FLEET.toml --trace TRACE.jsonl`` replays a
trace of requests against a fleet described in a file and prints, per
routing policy, cold loads, evictions, thrash, time to first token and the
requests left unserved, and lower bounds on the cold loads; ``--plot
FILE.png`` draws queue depth and loaded models over time.
``python -m cortex.sim.trace`` writes a trace, ``python -m cortex.sim.bound``
computes the bounds.

What runs is the gateway's code: ``cortex.gateway.router.Router`` with its
policy, evictor, queue and predictions (``cortex.gateway.scheduler.decide``),
its ``cortex.gateway.loader.Loader`` for the loads, the pollers of
``cortex.gateway.poller``, over ``cortex.gateway.state.FleetState``. Only
the neurons are fakes (:mod:`cortex.sim.neuron`): loads, unloads and
generation take the time the fleet file says, with ``trio.sleep``, under
``trio.testing.MockClock(autojump_threshold=0)``, so an hour of fleet time
replays in seconds. The clients (:mod:`cortex.sim.replay`) do what the
proxy does around a request: ``acquire``, generate, ``release`` with what
the proxy can measure, and retry a 503 after its Retry-After like the OpenAI
and Anthropic SDKs do; a session sends its next request after the previous
answer.

Agent sessions (``python -m cortex.sim.trace --agents N``) carry their
prompts as token runs: the replay shows them to the router's session
affinity as a real client's request, and the fake neurons' prompt caches
(:mod:`cortex.sim.cache`: slots and a host tier) serve what a real neuron's
would, so affinity and its interplay with cold loads replay too.

Modules: ``fleet`` (the fleet file), ``neuron`` (fake neurons and the
in-process ``NeuronLink``), ``cache`` (prompts as token runs, the prompt
cache), ``replay`` (the harness), ``trace`` (the generator), ``report``
(tables and plot), ``bound`` (lower bounds).
"""
