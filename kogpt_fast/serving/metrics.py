"""GET /metrics: Prometheus text through prometheus_client, one registry per server.

Counted by the HTTP layer: requests by endpoint and status, choices by finish reason, prompt and generated tokens,
time to first token and inter-token latency as the server sees them (from the request's arrival to each token's
event on the event loop), and request durations. Read from the engine at each scrape: running and waiting requests,
KV blocks used / cached / free / total, the prefix-cache hit rate, preemptions and steps.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import EngineStats

PREFIX = "kogpt"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # no *_created series: one line per metric is what the README lists (a process setting)


class EngineCollector:
    """The engine's state at scrape time (EngineStats)."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        gauges = [
            ("requests_running", "requests in the running batch", s.running),
            ("requests_waiting", "requests queued or preempted", s.waiting),
            ("kv_blocks_used", "KV blocks held by requests", s.blocks_used),
            ("kv_blocks_cached", "KV blocks held only by the prefix cache (reclaimable)", s.blocks_cached),
            ("kv_blocks_free", "KV blocks holding nothing", s.blocks_free),
            ("kv_blocks_total", "KV blocks in the pool", s.blocks_total),
            ("prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up",
             s.prefix_cache_hit_rate),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = [
            ("engine_preemptions", "requests preempted (recomputed later)", s.preemptions),
            ("engine_steps", "engine steps (one forward each)", s.steps),
            ("engine_requests_aborted", "engine requests aborted (disconnects, stop strings, shutdown)",
             s.requests_aborted),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.choices = Counter(f"{PREFIX}_completion_choices", "completion choices finished, by finish_reason",
                               ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of the completions served",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "from the request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.inter_token_latency = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                             "between a choice's consecutive tokens", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.request_duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                          "from a completion request's arrival to its last token",
                                          buckets=DURATION_BUCKETS, registry=r)
        r.register(EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
