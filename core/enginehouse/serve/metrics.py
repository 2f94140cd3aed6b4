"""Prometheus metrics (prometheus_client), named as vLLM names them.

Every metric is vLLM's name with the prefix `enginehouse:` in place of `vllm:`, the same type,
the same `model_name` label (and `finished_reason` where vLLM has it), so a Grafana dashboard
built for vLLM works after a prefix change. `http_requests_total` (by endpoint and status) is
this server's own. Each app has its own registry, so several servers in one process (tests,
notebooks) do not mix their counts.

Counters and histograms are updated on the server's event loop. The engine's own numbers
(running and waiting requests, KV-cache use, preemptions) are read from `Pipeline.stats()` when
`/metrics` is scraped and reported by `EngineCollector`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..engine.core import ITERATION_TOKEN_BUCKETS
from .spec_metrics import spec_decode_families

disable_created_metrics()  # no `_created` series beside every counter, as vLLM turns them off

PREFIX = "enginehouse:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds, as vLLM buckets them (time to first token spans queueing and prefill).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
TPOT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
LATENCY_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PREEMPTION_BUCKETS = (0, 1, 2, 5, 10, 20, 50)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's, for request_params_n
CACHE_CONFIG_LABELS = (
    "block_size",
    "cache_dtype",
    "enable_prefix_caching",
    "gpu_memory_utilization",  # EngineConfig.kv_cache_memory: a fraction, or a size
    "num_gpu_blocks",  # the KV cache's blocks, on whatever device
)


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class EngineCollector(Collector):
    """The engine's state at scrape time: vLLM's gauges and its preemption counter, summed
    over the replicas; with several replicas (`--data-parallel-size`), each one's too, in
    families of their own (`replica_...`, labelled `replica`) so that no sum counts twice."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Mapping[str, int] = {}
        self.replicas: list[Mapping[str, Any]] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if not self.stats:
            return
        s, labels = self.stats, [self.model_name]
        yield from _engine_families(PREFIX, [("", s)], ["model_name"], self.model_name)
        by_reason = GaugeMetricFamily(
            PREFIX + "num_requests_waiting_by_reason",
            "Requests waiting, by reason: capacity (no room to schedule them yet) or deferred "
            "(their grammar is compiling).",
            labels=["model_name", "reason"],
        )
        by_reason.add_metric([*labels, "capacity"], s.get("waiting", 0))
        by_reason.add_metric([*labels, "deferred"], s.get("waiting_deferred", 0))
        yield by_reason
        counts = s.get("iteration_tokens")
        if counts:
            steps = HistogramMetricFamily(
                PREFIX + "iteration_tokens_total",
                "Tokens in each engine step (prefill chunks and decodes together).",
                labels=["model_name"],
            )
            bounds = [*map(str, ITERATION_TOKEN_BUCKETS), "+Inf"]
            cumulative = list(itertools.accumulate(counts))
            steps.add_metric(
                labels, list(zip(bounds, cumulative)), sum_value=s.get("iteration_tokens_sum", 0)
            )
            yield steps
        yield from spec_decode_families(PREFIX, s, self.model_name)
        if "max_lora" in s:
            yield _lora_info(self.replicas or [s])
        if len(self.replicas) > 1:
            labelled = [(str(r.get("replica", i)), r) for i, r in enumerate(self.replicas)]
            yield from _engine_families(
                PREFIX + "replica_", labelled, ["model_name", "replica"], self.model_name
            )
            up = GaugeMetricFamily(
                PREFIX + "replica_up", "1 while the replica serves, 0 once it is down.",
                labels=["model_name", "replica"],
            )  # fmt: skip
            for replica, r in labelled:
                up.add_metric([self.model_name, replica], r.get("alive", 1))
            yield up


def _lora_info(replicas: list[Mapping[str, Any]]) -> GaugeMetricFamily:
    """vLLM's `lora_requests_info`: the adapters with running and with waiting requests (over
    every replica), comma-separated in labels, and the slots; its value is the time now."""
    running: set[str] = set()
    waiting: set[str] = set()
    for r in replicas:
        running.update(r.get("lora_running", {}))
        waiting.update(r.get("lora_waiting", {}))
    info = GaugeMetricFamily(
        PREFIX + "lora_requests_info",
        "Running stats on LoRA requests: the adapters of running and waiting requests.",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    slots = str(replicas[0].get("max_lora", 0)) if replicas else "0"
    info.add_metric([slots, ",".join(sorted(running)), ",".join(sorted(waiting))], time.time())
    return info


def _engine_families(
    prefix: str, rows: list[tuple[str, Mapping[str, Any]]], labels: list[str], model: str
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The engine's gauges and counters, one series per row (a replica, or the sum)."""

    def values(s: Mapping[str, Any]) -> dict[str, float]:
        used, total = s.get("kv_blocks_used", 0), max(1, s.get("kv_blocks_total", 0))
        return {
            "num_requests_running": s.get("running", 0),
            "num_requests_waiting": s.get("waiting", 0),
            "kv_cache_usage_perc": used / total,
            "num_preemptions": s.get("preemptions", 0),
            "engine_steps": s.get("steps", 0),
            "engine_step_sequences": s.get("step_sequences", 0),
        }

    table = [(key, values(s)) for key, s in rows]
    for name, kind, doc in ENGINE_SERIES:
        family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        family = family_type(prefix + name, doc, labels=labels)
        for key, v in table:
            family.add_metric([model, key] if key else [model], v[name])
        yield family


ENGINE_SERIES = (
    ("num_requests_running", "gauge", "Requests being computed."),
    ("num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    (
        "kv_cache_usage_perc",
        "gauge",
        "KV-cache usage: 1 means 100 percent of the blocks are in use.",
    ),
    (
        "num_preemptions",
        "counter",
        "Requests preempted (their KV freed, recomputed later) for lack of KV blocks.",
    ),
    # This server's own: their rates' ratio is the average batch per engine step.
    ("engine_steps", "counter", "Engine steps run (each one runner.execute)."),
    (
        "engine_step_sequences",
        "counter",
        "Sequences in the engine's steps, summed: over engine_steps, the average batch.",
    ),
)


class ServerMetrics:
    """Everything `/metrics` reports, in a registry of this server's own."""

    def __init__(self, model_name: str = "", max_model_len: int = 50_000) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine = EngineCollector(model_name)
        self.registry.register(self.engine)
        r, model = self.registry, ["model_name"]

        def counter(name: str, doc: str, labels: list[str] = model) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, model, buckets=buckets, registry=r)

        self.http_requests = counter(
            "http_requests", "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
        )  # fmt: skip
        self.request_success = counter(
            "request_success", "Finished requests (one per choice), by finish reason.",
            ["model_name", "finished_reason"],
        )  # fmt: skip
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Between consecutive generated tokens of one request.",
            TPOT_BUCKETS,
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds",
            "From a request's arrival to its end.",
            LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", TOKEN_BUCKETS
        )
        # The engine's own timing of each finished request (vLLM's request_*_time_seconds).
        self.request_times = {
            part: histogram(f"request_{part}_time_seconds", doc, LATENCY_BUCKETS)
            for part, doc in (
                ("queue", "From a request's arrival in the engine to its first scheduling."),
                ("prefill", "From a request's first scheduling to its first token."),
                ("decode", "From a request's first token to its end."),
                ("inference", "From a request's first scheduling to its end."),
            )
        }
        self.request_num_preemptions = histogram(
            "request_num_preemptions",
            "Times each finished request was preempted (its KV freed, recomputed later).",
            PREEMPTION_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            TPOT_BUCKETS,
        )
        self.request_params_n = histogram(
            "request_params_n", "The n (choices) of each prompt of a request.", N_BUCKETS
        )
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens",
            "The max_tokens of each prompt of a request (what the context leaves, when unset).",
            buckets_1_2_5(max_model_len),
        )
        self.cache_config_info = Gauge(
            PREFIX + "cache_config_info",
            "The KV cache's configuration, in labels (named as vLLM's CacheConfig).",
            CACHE_CONFIG_LABELS,
            registry=r,
        )

    def cache_config(self, **labels: object) -> None:
        """Set `cache_config_info`: 1, with the KV cache's settings as labels."""
        self.cache_config_info.labels(**{k: str(labels.get(k)) for k in CACHE_CONFIG_LABELS}).set(1)

    def request_params(self, n: int, max_tokens: int) -> None:
        """One prompt of a request started, with `n` choices of `max_tokens` at most."""
        self.request_params_n.labels(self.model_name).observe(n)
        self.request_params_max_tokens.labels(self.model_name).observe(max_tokens)

    def answered(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def tokens(self, count: int, seconds_each: float | None) -> None:
        """`count` new tokens; `seconds_each` between them (None for a request's first)."""
        self.generation_tokens.labels(self.model_name).inc(count)
        if seconds_each is not None:
            for _ in range(count):
                self.tpot.labels(self.model_name).observe(seconds_each)
                self.inter_token_latency.labels(self.model_name).observe(seconds_each)

    def finished(
        self,
        reason: str,
        prompt_tokens: int,
        generated: int,
        cached: int,
        seconds: float,
        timing: Mapping[str, float] | None = None,
    ) -> None:
        model = self.model_name
        if timing is not None:  # the engine's own (None for a request refused before it)
            for part, hist in self.request_times.items():
                hist.labels(model).observe(timing[part])
            self.request_num_preemptions.labels(model).observe(timing["preemptions"])
        self.request_success.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.prefix_cache_queries.labels(model).inc(prompt_tokens)
        self.prefix_cache_hits.labels(model).inc(cached)
        self.request_prompt_tokens.labels(model).observe(prompt_tokens)
        self.request_generation_tokens.labels(model).observe(generated)
        self.e2e_latency.labels(model).observe(seconds)

    def render(
        self, stats: Mapping[str, Any], replicas: list[Mapping[str, Any]] | None = None
    ) -> bytes:
        """The exposition text, with the engine's `stats()` as of now (and each replica's)."""
        self.engine.stats, self.engine.replicas = stats, replicas or []
        return generate_latest(self.registry)
