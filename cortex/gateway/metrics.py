"""The gateway's Prometheus metrics, in a registry of their own.

Served on their own port by ``prometheus_client.make_asgi_app``. Model labels
only ever hold ids the fleet knows (catalogue, aliases resolved, or loaded
somewhere): a client's arbitrary model name would grow the series without
bound, so an unknown one is labelled ``unknown``.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

UNKNOWN = "unknown"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 5000)


@attrs.define(eq=False)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    duration: Histogram
    first_token: Histogram
    tokens: Counter
    tokens_per_second: Histogram
    cold_starts: Counter
    load_seconds: Histogram
    evictions: Counter
    stalls: Counter
    in_flight: Gauge
    neuron_up: Gauge
    queue_depth: Gauge
    route_decisions: Counter
    predicted_ttft: Histogram
    observed_ttft: Histogram
    queue_wait: Histogram
    gateway_queue: Gauge
    thrash: Counter
    affinity: Counter
    follow_ups: Counter
    follow_ups_expected: Gauge
    prompt_cache_hit_ratio: Gauge
    prompt_cache_reused_tokens: Gauge

    @classmethod
    def create(cls) -> GatewayMetrics:
        registry = CollectorRegistry(auto_describe=True)
        kw: dict[str, Any] = {"registry": registry}
        return cls(
            registry=registry,
            requests=Counter(
                "cortex_requests",
                "Requests answered, by endpoint, model and the neuron that served them; "
                "every route's (errors are a subset), model unknown and no neuron where "
                "the route has none.",
                ["endpoint", "model", "neuron"],
                **kw,
            ),
            errors=Counter(
                "cortex_request_errors",
                "Answers with an error status, by route (mid-stream: the status sent); "
                "every route's, model unknown where the route has none.",
                ["endpoint", "model", "status"],
                **kw,
            ),
            duration=Histogram(
                "cortex_request_duration_seconds",
                "Time from request to the last byte of the answer.",
                ["endpoint", "model"],
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            first_token=Histogram(
                "cortex_time_to_first_token_seconds",
                "Time from request to the first byte of a streamed answer.",
                ["endpoint", "model", "neuron"],
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            tokens=Counter(
                "cortex_tokens",
                "Tokens processed, from the neurons' usage reports.",
                ["model", "neuron", "kind"],
                **kw,
            ),
            tokens_per_second=Histogram(
                "cortex_tokens_per_second",
                "Completion tokens per second of generation (after the first byte).",
                ["model", "neuron"],
                buckets=_RATE_BUCKETS,
                **kw,
            ),
            cold_starts=Counter(
                "cortex_cold_starts",
                "Loads this gateway started, for a request or to preload a pinned model.",
                ["model", "neuron"],
                **kw,
            ),
            load_seconds=Histogram(
                "cortex_model_load_seconds",
                "Time a cold load took, evictions included.",
                ["model", "neuron"],
                buckets=_LOAD_BUCKETS,
                **kw,
            ),
            evictions=Counter(
                "cortex_evictions",
                "Models unloaded to make room for another.",
                ["model", "neuron"],
                **kw,
            ),
            stalls=Counter(
                "cortex_model_stalls",
                "Times a model on a neuron ran past stall_timeout with requests and no progress.",
                ["model", "neuron"],
                **kw,
            ),
            in_flight=Gauge(
                "cortex_in_flight",
                "Requests being proxied now.",
                ["model", "neuron"],
                **kw,
            ),
            neuron_up=Gauge(
                "cortex_neuron_up", "1 when the neuron answered its last poll.", ["neuron"], **kw
            ),
            queue_depth=Gauge(
                "cortex_neuron_queue_depth",
                "Requests waiting on the neuron, from its last health report.",
                ["neuron"],
                **kw,
            ),
            route_decisions=Counter(
                "cortex_route_decisions",
                "Routing decisions by kind: loaded, loading, cold, evict, scale_out, "
                "scale_in, queued (waited for room), rejected.",
                ["kind"],
                **kw,
            ),
            predicted_ttft=Histogram(
                "cortex_predicted_time_to_first_token_seconds",
                "Time to first token the router predicted for the route it took.",
                ["kind"],
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            observed_ttft=Histogram(
                "cortex_observed_time_to_first_token_seconds",
                "Time to first token of the same routes, where the caller reported it "
                "(compare with the predicted histogram).",
                ["kind"],
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            queue_wait=Histogram(
                "cortex_queue_wait_seconds",
                "Time requests waited in the gateway's per-model queue.",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            gateway_queue=Gauge(
                "cortex_gateway_queue_depth",
                "Requests waiting in the gateway's queue, by model.",
                ["model"],
                **kw,
            ),
            thrash=Counter(
                "cortex_thrash",
                "Cold loads of a model evicted less than [routing] thrash_window seconds before.",
                ["model"],
                **kw,
            ),
            affinity=Counter(
                "cortex_affinity",
                "Requests routed with a session or prefix affinity: kept (to the replica "
                "remembered for it), broken (elsewhere: saturated, down, unloaded), new "
                "(none remembered).",
                ["result"],
                **kw,
            ),
            follow_ups=Counter(
                "cortex_follow_ups",
                "Answers that called a tool, by what became of the request with the tool's "
                "result: kept (it came within the learned window, the model still loaded "
                "where the answer came from), evicted (within it, the model gone), late "
                "(after the window), expired (none within [routing] follow_up_limit).",
                ["result"],
                **kw,
            ),
            follow_ups_expected=Gauge(
                "cortex_follow_ups_expected",
                "Answers that called a tool whose result has not come yet (within "
                "[routing] follow_up_limit): their models are kept.",
                **kw,
            ),
            prompt_cache_hit_ratio=Gauge(
                "cortex_prompt_cache_hit_ratio",
                "Share of requests that reused cached prompt tokens, since the model's load "
                "on that neuron (from its /models report).",
                ["model", "neuron"],
                **kw,
            ),
            prompt_cache_reused_tokens=Gauge(
                "cortex_prompt_cache_reused_tokens",
                "Prompt tokens reused from the prompt cache (slots and host tier), since the "
                "model's load on that neuron (from its /models report).",
                ["model", "neuron"],
                **kw,
            ),
        )

    def asgi_app(self) -> Any:
        return make_asgi_app(self.registry)
