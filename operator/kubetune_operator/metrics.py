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
        self.progress_events = Counter(
            "kubetune_progress_events",
            "Progress pushes from trainers, by result (accepted, rejected, invalid).",
            ["result"],
            registry=self.registry,
        )

    def track_phases(self, count: Callable[[str], int]) -> None:
        """Make the phase gauge read `count(phase)` at scrape time."""
        for phase in PHASES:
            self.finetunejobs.labels(phase).set_function(lambda p=phase: count(p))
