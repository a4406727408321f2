"""Prometheus metrics of the operator (served at /metrics by the progress server)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from kubetune.api.v1alpha1 import PHASES


class OperatorMetrics:
    """One registry per operator, so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.finetunejobs = Gauge(
            "kubetune_finetunejobs",
            "FineTuneJobs by phase, as last written to their status.",
            ["phase"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "kubetune_reconciles", "Reconciles of a FineTuneJob.", registry=self.registry
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors", "Reconciles that raised.", registry=self.registry
        )
        self.status_patches = Counter(
            "kubetune_status_patches", "FineTuneJob status patches sent.", registry=self.registry
        )
        self.jobs_created = Counter(
            "kubetune_jobs_created", "Trainer Jobs created.", registry=self.registry
        )
        self.events_posted = Counter(
            "kubetune_events_posted", "Events posted on FineTuneJobs.", registry=self.registry
        )
        self.api_writes = Counter(
            "kubetune_api_writes",
            "Requests that change something on the API server, by resource.",
            ["resource"],
            registry=self.registry,
        )
        self.token_reviews = Counter(
            "kubetune_token_reviews",
            "TokenReviews sent to check progress tokens (not answered from the cache).",
            registry=self.registry,
        )
        self.progress_events = Counter(
            "kubetune_progress_events",
            "Progress pushes from trainers, by result (accepted, rejected, invalid, "
            "forwarded, unforwarded, throttled).",
            ["result"],
            registry=self.registry,
        )
        self.tokens_refused = Counter(
            "kubetune_progress_tokens_refused",
            "Progress tokens refused without a TokenReview, by reason (bad signature, expired, "
            "wrong audience, refused before, ...).",
            ["reason"],
            registry=self.registry,
        )

        # Chargeback: what trainer pods used, by namespace. Increased by what each status
        # write adds to status.usage, which holds the totals: after an operator restart the
        # counters start again from zero (a counter reset, which rate() and increase() handle)
        # and nothing is counted twice.
        self.gpu_seconds = Counter(
            "kubetune_gpu_seconds",
            "GPU-seconds of trainer pods, by namespace.",
            ["namespace"],
            registry=self.registry,
        )
        self.tokens_trained = Counter(
            "kubetune_tokens_trained",
            "Tokens trained, by namespace.",
            ["namespace"],
            registry=self.registry,
        )
        self.estimated_cost = Counter(
            "kubetune_estimated_cost",
            "Estimated cost of GPU time, by namespace and currency.",
            ["namespace", "currency"],
            registry=self.registry,
        )

    def count_usage(self, namespace: str, before: dict | None, after: dict | None) -> None:
        """Add what a status write adds to status.usage."""
        before, after = before or {}, after or {}

        def grown(name: str) -> float:
            return max(0.0, float(after.get(name) or 0) - float(before.get(name) or 0))

        if grown("gpuSeconds"):
            self.gpu_seconds.labels(namespace).inc(grown("gpuSeconds"))
        if grown("tokensTrained"):
            self.tokens_trained.labels(namespace).inc(grown("tokensTrained"))
        if grown("estimatedCost") and after.get("currency"):
            self.estimated_cost.labels(namespace, after["currency"]).inc(grown("estimatedCost"))

    def track_phases(self, count: Callable[[str], int]) -> None:
        """Make the phase gauge read `count(phase)` at scrape time."""
        for phase in PHASES:
            self.finetunejobs.labels(phase).set_function(lambda p=phase: count(p))

    def count_write(self, method: str, path: str) -> None:
        self.api_writes.labels(resource_of(path)).inc()


def resource_of(path: str) -> str:
    """`jobs`, `finetunejobs/status`, `events`... from an API path."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        parts = parts[parts.index("namespaces") + 2 :]
    else:  # cluster-scoped: /apis/<group>/<version>/<resource>...
        parts = parts[3:] if parts[0] == "apis" else parts[2:]
    return "/".join(parts[:1] + parts[2:3])
