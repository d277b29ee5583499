"""The neuron's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cortex.fleet import DeviceSample, ModelStatus
from cortex.neuron.workers import Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


MIB = 1024 * 1024

#: Gauges with a sample per model: (name, help, its value in a ModelStatus).
_MODEL_GAUGES: tuple[tuple[str, str, Callable[[ModelStatus], float]], ...] = (
    ("cortex_neuron_queue_depth", "Requests waiting for a model", lambda m: m.queued),
    ("cortex_neuron_in_flight", "Requests being generated", lambda m: m.in_flight),
    (
        "cortex_neuron_model_memory_bytes",
        "Memory a loaded model uses",
        lambda m: m.memory_mb * MIB,
    ),
)

#: Gauges with a sample per device: (name, help, its value in a DeviceSample;
#: None when the device does not tell, and then no sample).
_DEVICE_GAUGES: tuple[tuple[str, str, Callable[[DeviceSample], float | None]], ...] = (
    (
        "cortex_neuron_device_memory_used_bytes",
        "Device memory in use",
        lambda d: d.vram_used_mb * MIB,
    ),
    (
        "cortex_neuron_device_memory_free_bytes",
        "Device memory free",
        lambda d: d.vram_free_mb * MIB,
    ),
    (
        "cortex_neuron_device_utilization_ratio",
        "Device utilisation",
        lambda d: d.utilization_pct / 100 if d.utilization_pct is not None else None,
    ),
    ("cortex_neuron_device_temperature_celsius", "Device temperature", lambda d: d.temp_c),
)

#: The engines' prompt caches (``PromptCacheStatistics``), a family per row:
#: (family, name, help, labels besides ``model``, label values -> the field).
_Family = type[CounterMetricFamily] | type[GaugeMetricFamily]
_PROMPT_CACHE: tuple[tuple[_Family, str, str, list[str], dict[tuple[str, ...], str]], ...] = (
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_requests",
        "Requests by whether they reused cached prompt tokens",
        ["result"],
        {("hit",): "hits", ("miss",): "misses"},
    ),
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_reused_tokens",
        "Prompt tokens reused, by where their KV state was: a slot or the host tier",
        ["tier"],
        {("slot",): "slot_tokens", ("host",): "host_tokens"},
    ),
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_host_saves",
        "States saved to host memory",
        [],
        {(): "host_saves"},
    ),
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_host_restores",
        "Saved states restored into a slot",
        [],
        {(): "host_restores"},
    ),
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_host_failures",
        "Restores given up (no contiguous run of free cells): the prompt was evaluated",
        [],
        {(): "host_failures"},
    ),
    (
        CounterMetricFamily,
        "cortex_neuron_prompt_cache_host_evictions",
        "Saved states dropped for room",
        [],
        {(): "host_evictions"},
    ),
    (
        GaugeMetricFamily,
        "cortex_neuron_prompt_cache_host_bytes",
        "Bytes the host tier holds",
        [],
        {(): "host_bytes"},
    ),
    (
        GaugeMetricFamily,
        "cortex_neuron_prompt_cache_host_budget_bytes",
        "The host tier's byte budget",
        [],
        {(): "host_budget_bytes"},
    ),
    (
        GaugeMetricFamily,
        "cortex_neuron_prompt_cache_host_entries",
        "States the host tier holds",
        [],
        {(): "host_entries"},
    ),
)


class _StateCollector(Collector):
    """Reads live state at scrape time: queues, loaded models, devices."""

    def __init__(
        self,
        models: Callable[[], list[ModelStatus]],
        devices: Callable[[], list[DeviceSample]],
    ) -> None:
        self._models = models
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        statuses = self._models()
        loaded = GaugeMetricFamily("cortex_neuron_loaded_models", "Models loaded and serving")
        loaded.add_metric([], sum(1 for m in statuses if m.status == "loaded"))
        yield loaded
        for name, documentation, value in _MODEL_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for m in statuses:
                family.add_metric([m.id], value(m))
            yield family
        yield from _prompt_cache_metrics(statuses)
        samples = self._devices()
        for name, documentation, reading in _DEVICE_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["device"])
            for d in samples:
                found = reading(d)
                if found is not None:
                    family.add_metric([str(d.index)], found)
            yield family


def _prompt_cache_metrics(statuses: list[ModelStatus]) -> Iterator[Metric]:
    """The engines' prompt caches, per model (``_PROMPT_CACHE``).

    The counters run from the model's load: a reload starts them again,
    which Prometheus reads as a counter reset.
    """
    caches = [(m.id, m.prompt_cache) for m in statuses if m.prompt_cache is not None]
    for kind, name, documentation, labels, fields in _PROMPT_CACHE:
        family = kind(name, documentation, labels=["model", *labels])
        for model_id, cache in caches:
            for values, field in fields.items():
                family.add_metric([model_id, *values], getattr(cache, field))
        yield family


class NeuronMetrics:
    def __init__(
        self,
        models: Callable[[], list[ModelStatus]],
        devices: Callable[[], list[DeviceSample]],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter(
            "cortex_neuron_tokens_generated", "Tokens generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "cortex_neuron_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "cortex_neuron_prompt_tokens_cached",
            "Prompt tokens read from the engine's prompt cache (part of the prompt tokens)",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "cortex_neuron_requests", "Generation requests", ["model", "endpoint"], registry=r
        )
        self.rejected = Counter(
            "cortex_neuron_requests_rejected", "Requests refused: queue full", ["model"], registry=r
        )
        self.tokens_per_second = Histogram(
            "cortex_neuron_tokens_per_second",
            "Decode speed of each generation",
            ["model"],
            buckets=(1, 5, 10, 25, 50, 75, 100, 150, 200, 400, 800, 1600, 5000),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "cortex_neuron_time_to_first_token_seconds",
            "From request to first generated text",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_seconds = Histogram(
            "cortex_neuron_model_load_seconds",
            "Model load time",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        r.register(_StateCollector(models, devices))

    def job_finished(self, model: str, job: Job) -> None:
        """Count the tokens of a job that ran, once, however it ended (client gone included).

        Called as its answer ends and again when its worker is done with it
        (which comes first depends on who reads the last event when).
        """
        if job.counted:
            return
        job.counted = True
        self.tokens.labels(model).inc(job.completion_tokens)
        self.prompt_tokens.labels(model).inc(job.prompt_tokens)
        self.cached_prompt_tokens.labels(model).inc(job.cached_tokens)

    def decode_rate(self, model: str, rate: float) -> None:
        """Observe the decode speed of a generation that ran to its end."""
        if not math.isnan(rate):
            self.tokens_per_second.labels(model).observe(rate)
