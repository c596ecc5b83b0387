"""Prometheus metrics in the app's own registry (no process-wide state), and the engine's gauges."""

from __future__ import annotations


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "Completed requests", ["route"], registry=self.registry)
        self.errors = Counter("lmforge_errors", "Error responses", ["status"], registry=self.registry)
        self.dropped = Counter("lmforge_dropped", "Work dropped, by reason", ["reason"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def count_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def count_dropped(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def render(self, stats: dict, extra: dict | None = None) -> bytes:
        from prometheus_client import generate_latest

        gauges = {**{f"engine_{k}": v for k, v in stats.items()}, **(extra or {})}
        text = "".join(f"# TYPE lmforge_{k} gauge\nlmforge_{k} {v}\n" for k, v in gauges.items())
        return generate_latest(self.registry) + text.encode()
