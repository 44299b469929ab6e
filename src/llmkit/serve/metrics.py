"""Prometheus metrics of the server, in a per-app `CollectorRegistry` (two apps in one process, as in the
tests, never collide in the global registry). Names follow vLLM's, prefixed ``llmkit_``.

Histograms (seconds): time_to_first_token_seconds (request received -> first token), time_per_output_token_
seconds (mean gap between later tokens, one observation per request), e2e_request_latency_seconds.
Gauges (set from `EngineRunner.stats()` at each scrape): num_requests_waiting, num_requests_running,
kv_cache_usage_ratio (cache slots used / max_batch), prefix_cache_hit_rate (block hits / lookups).
With LoRA adapters served (`--adapter NAME=DIR`): lora_adapters_registered, lora_adapters_resident,
lora_resident_bytes, lora_budget_bytes, and since start lora_adapter_loads (reads from disk) and
lora_adapter_evictions (paged out to make room).
Counters: prompt_tokens_total, generation_tokens_total, request_success_total{finish_reason} (stop,
length, cancelled, error), http_requests_total{status} (every response, unhandled 500s included).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    """All server metrics on one registry; `render(stats)` gives the text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("llmkit_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("llmkit_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", buckets=_TPOT, registry=r)
        self.e2e = Histogram("llmkit_e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_LATENCY, registry=r)
        self.waiting = Gauge("llmkit_num_requests_waiting", "Requests waiting for a cache slot.", registry=r)
        self.running = Gauge("llmkit_num_requests_running", "Requests decoding.", registry=r)
        self.kv_usage = Gauge("llmkit_kv_cache_usage_ratio", "KV cache slots used / max_batch.", registry=r)
        self.prefix_hit = Gauge("llmkit_prefix_cache_hit_rate", "Prefix cache block hits / lookups.", registry=r)
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("llmkit_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("llmkit_request_success", "Finished engine requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.http = Counter("llmkit_http_requests", "HTTP responses by status code.", ["status"], registry=r)
        self.lora = {key: Gauge(f"llmkit_lora_{name}", doc, registry=r) for key, name, doc in [
            ("adapters", "adapters_registered", "LoRA adapters registered (loaded or paged out)."),
            ("resident", "adapters_resident", "LoRA adapters whose factors are in memory."),
            ("resident_bytes", "resident_bytes", "Bytes of the resident adapters' factors."),
            ("budget_bytes", "budget_bytes", "Memory budget of the adapters' factors, bytes."),
            ("loads", "adapter_loads", "Adapter reads from disk since start."),
            ("evictions", "adapter_evictions", "Adapters paged out to make room, since start.")]}

    def observe_request(self, start: float, first: float | None, end: float, n_tokens: int) -> None:
        """One finished choice: received at `start`, first token at `first`, done at `end` (monotonic s)."""
        self.e2e.observe(end - start)
        if first is not None:
            self.ttft.observe(first - start)
            if n_tokens > 1:
                self.tpot.observe((end - first) / (n_tokens - 1))

    def render(self, stats: dict) -> bytes:
        self.waiting.set(stats["waiting"])
        self.running.set(stats["running"])
        self.kv_usage.set(stats["kv_slots_used"] / max(1, stats["kv_slots_total"]))
        looked = stats["prefix_hits"] + stats["prefix_misses"]
        self.prefix_hit.set(stats["prefix_hits"] / looked if looked else 0.0)
        for key, value in (stats.get("adapters") or {}).items():
            if key in self.lora:
                self.lora[key].set(value)
        return generate_latest(self.registry)
