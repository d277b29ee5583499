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
        queue = GaugeMetricFamily(
            "cortex_neuron_queue_depth", "Requests waiting for a model", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "cortex_neuron_in_flight", "Requests being generated", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "cortex_neuron_model_memory_bytes", "Memory a loaded model uses", labels=["model"]
        )
        for m in statuses:
            queue.add_metric([m.id], m.queued)
            in_flight.add_metric([m.id], m.in_flight)
            memory.add_metric([m.id], m.memory_mb * 1024 * 1024)
        yield queue
        yield in_flight
        yield memory
        yield from _prompt_cache_metrics(statuses)
        samples = self._devices()
        used = GaugeMetricFamily(
            "cortex_neuron_device_memory_used_bytes", "Device memory in use", labels=["device"]
        )
        free = GaugeMetricFamily(
            "cortex_neuron_device_memory_free_bytes", "Device memory free", labels=["device"]
        )
        util = GaugeMetricFamily(
            "cortex_neuron_device_utilization_ratio", "Device utilisation", labels=["device"]
        )
        temp = GaugeMetricFamily(
            "cortex_neuron_device_temperature_celsius", "Device temperature", labels=["device"]
        )
        for d in samples:
            label = [str(d.index)]
            used.add_metric(label, d.vram_used_mb * 1024 * 1024)
            free.add_metric(label, d.vram_free_mb * 1024 * 1024)
            if d.utilization_pct is not None:
                util.add_metric(label, d.utilization_pct / 100)
            if d.temp_c is not None:
                temp.add_metric(label, d.temp_c)
        yield from (used, free, util, temp)


def _prompt_cache_metrics(statuses: list[ModelStatus]) -> Iterator[Metric]:
    """The engines' prompt caches (``PromptCacheStatistics``), per model.

    The counters run from the model's load: a reload starts them again,
    which Prometheus reads as a counter reset.
    """
    requests = CounterMetricFamily(
        "cortex_neuron_prompt_cache_requests",
        "Requests by whether they reused cached prompt tokens",
        labels=["model", "result"],
    )
    reused = CounterMetricFamily(
        "cortex_neuron_prompt_cache_reused_tokens",
        "Prompt tokens reused, by where their KV state was: a slot or the host tier",
        labels=["model", "tier"],
    )
    saves = CounterMetricFamily(
        "cortex_neuron_prompt_cache_host_saves", "States saved to host memory", labels=["model"]
    )
    restores = CounterMetricFamily(
        "cortex_neuron_prompt_cache_host_restores",
        "Saved states restored into a slot",
        labels=["model"],
    )
    failures = CounterMetricFamily(
        "cortex_neuron_prompt_cache_host_failures",
        "Restores given up (no contiguous run of free cells): the prompt was evaluated",
        labels=["model"],
    )
    evictions = CounterMetricFamily(
        "cortex_neuron_prompt_cache_host_evictions",
        "Saved states dropped for room",
        labels=["model"],
    )
    held = GaugeMetricFamily(
        "cortex_neuron_prompt_cache_host_bytes", "Bytes the host tier holds", labels=["model"]
    )
    budget = GaugeMetricFamily(
        "cortex_neuron_prompt_cache_host_budget_bytes",
        "The host tier's byte budget",
        labels=["model"],
    )
    entries = GaugeMetricFamily(
        "cortex_neuron_prompt_cache_host_entries", "States the host tier holds", labels=["model"]
    )
    for m in statuses:
        cache = m.prompt_cache
        if cache is None:
            continue
        requests.add_metric([m.id, "hit"], cache.hits)
        requests.add_metric([m.id, "miss"], cache.misses)
        reused.add_metric([m.id, "slot"], cache.slot_tokens)
        reused.add_metric([m.id, "host"], cache.host_tokens)
        saves.add_metric([m.id], cache.host_saves)
        restores.add_metric([m.id], cache.host_restores)
        failures.add_metric([m.id], cache.host_failures)
        evictions.add_metric([m.id], cache.host_evictions)
        held.add_metric([m.id], cache.host_bytes)
        budget.add_metric([m.id], cache.host_budget_bytes)
        entries.add_metric([m.id], cache.host_entries)
    yield from (requests, reused, saves, restores, failures, evictions, held, budget, entries)


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
