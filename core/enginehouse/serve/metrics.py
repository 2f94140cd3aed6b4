"""Prometheus metrics in the text exposition format, written by hand (no extra dependency).

Counters and histograms are updated on the server's event loop only, so they need no lock.
The engine's own gauges (running and waiting requests, KV blocks) are read from
`Pipeline.stats()` when `/metrics` is scraped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# Seconds. Time to first token spans queueing and prefill; per-token latency is one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(names: Iterable[str], values: Iterable[object]) -> str:
    def escape(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    pairs = [f'{n}="{escape(v)}"' for n, v in zip(names, values)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: object) -> None:
        key = tuple(str(v) for v in labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *labels: object) -> float:
        return self.values.get(tuple(str(v) for v in labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, key)} {_number(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)  # per bucket, made cumulative when rendered
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_number(value)}"]


class ServerMetrics:
    """Everything `/metrics` reports."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "enginehouse_http_requests_total",
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
        )
        self.finished = Counter(
            "enginehouse_generations_finished_total",
            "Generations (one per choice) finished, by finish reason.",
            ("finish_reason",),
        )
        self.prompt_tokens = Counter(
            "enginehouse_prompt_tokens_total", "Prompt tokens of finished generations."
        )
        self.generation_tokens = Counter("enginehouse_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(
            "enginehouse_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "enginehouse_time_per_output_token_seconds",
            "Between consecutive generated tokens of one generation.",
            TPOT_BUCKETS,
        )
        self.duration = Histogram(
            "enginehouse_generation_duration_seconds",
            "From the request's arrival to the generation's end.",
            DURATION_BUCKETS,
        )

    def render(self, stats: Mapping[str, int]) -> str:
        """The exposition text, with the engine's `stats()` as gauges."""
        lines: list[str] = []
        for metric in (
            self.http_requests,
            self.finished,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.tpot,
            self.duration,
        ):
            lines += metric.render()
        lines += _gauge(
            "enginehouse_requests_running", "Generations being computed.", stats["running"]
        )
        lines += _gauge(
            "enginehouse_requests_waiting", "Generations queued for a slot.", stats["waiting"]
        )
        lines += _gauge(
            "enginehouse_kv_cache_blocks_used", "KV-cache blocks in use.", stats["kv_blocks_used"]
        )
        lines += _gauge(
            "enginehouse_kv_cache_blocks_total", "KV-cache blocks.", stats["kv_blocks_total"]
        )
        lines += [
            "# HELP enginehouse_preemptions_total Generations preempted for lack of KV blocks.",
            "# TYPE enginehouse_preemptions_total counter",
            f"enginehouse_preemptions_total {stats['preemptions']}",
        ]
        return "\n".join(lines) + "\n"
