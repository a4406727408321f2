"""The controller's parts that need no API server: the cache's bookkeeping and the work
queue's promises (a key queued once, handled by one worker at a time, retried on failure)."""

from __future__ import annotations

import asyncio
import json

from kubetune.api.contract import ProgressEvent, Reason
from kubetune_operator.cache import Cache
from kubetune_operator.validation import Problem
from kubetune_operator.workqueue import WorkQueue

FTJ = {
    "metadata": {"name": "tune", "namespace": "team-a", "uid": "ftj-1"},
    "spec": {
        "model": {"uri": "s3://m/"},
        "dataset": {"uri": "s3://d/x.jsonl"},
        "output": {"uri": "s3://o/"},
    },
}
JOB = {
    "metadata": {
        "name": "tune-trainer",
        "namespace": "team-a",
        "uid": "job-1",
        "ownerReferences": [
            {"kind": "FineTuneJob", "name": "tune", "uid": "ftj-1", "controller": True}
        ],
    },
    "spec": {"suspend": False},
}
POD = {
    "metadata": {
        "name": "tune-trainer-x",
        "namespace": "team-a",
        "uid": "pod-1",
        "labels": {"batch.kubernetes.io/job-name": "tune-trainer"},
        "ownerReferences": [
            {"kind": "Job", "name": "tune-trainer", "uid": "job-1", "controller": True}
        ],
    },
    "status": {"phase": "Running"},
}


def test_job_and_pod_events_lead_to_their_finetunejob() -> None:
    cache = Cache()
    assert cache.observe_ftj("ADDED", FTJ) == (("team-a", "tune"), False)
    assert cache.observe_job("ADDED", JOB) == ("team-a", "tune")
    assert cache.observe_pod("ADDED", POD) == ("team-a", "tune")
    assert cache.pod("pod-1")["metadata"]["name"] == "tune-trainer-x"
    assert [
        p["metadata"]["uid"] for p in cache.job_pods(cache.jobs[("team-a", "tune-trainer")])
    ] == ["pod-1"]
    cache.observe_pod("DELETED", POD)
    assert cache.pod("pod-1") is None


def test_a_pod_of_an_earlier_job_of_the_same_name_is_not_counted() -> None:
    cache = Cache()
    cache.observe_job("ADDED", JOB)
    old = {
        **POD,
        "metadata": {
            **POD["metadata"],
            "uid": "pod-0",
            "ownerReferences": [{"kind": "Job", "uid": "job-0", "controller": True}],
        },
    }
    cache.observe_pod("ADDED", old)
    cache.observe_pod("ADDED", POD)
    pods = cache.job_pods(cache.jobs[("team-a", "tune-trainer")])
    assert [p["metadata"]["uid"] for p in pods] == ["pod-1"]


def test_a_finetunejob_created_again_under_its_name_starts_afresh() -> None:
    cache = Cache()
    cache.observe_ftj("ADDED", FTJ)
    event = ProgressEvent(event="step", time="2026-01-01T00:00:00Z", step=3)
    assert cache.observe_progress(("team-a", "tune"), event)
    again = {**FTJ, "metadata": {**FTJ["metadata"], "uid": "ftj-2"}}
    assert cache.observe_ftj("ADDED", again) == (("team-a", "tune"), True)
    assert ("team-a", "tune") not in cache.progress
    assert not cache.observe_progress(("team-a", "other"), event)  # unknown job: ignored


def with_schema(description_bytes: int) -> dict:
    """FTJ with a JSON-schema output format whose description is that long, applied with
    `kubectl apply` (whose last-applied annotation repeats the whole object) and with
    managedFields, and a status."""
    schema = {"type": "object", "description": "x" * description_bytes}
    big = json.loads(json.dumps(FTJ))
    big["spec"]["evaluation"] = {"format": {"type": "jsonSchema", "schema": schema}}
    big["metadata"].update(
        generation=3,
        annotations={"kubectl.kubernetes.io/last-applied-configuration": json.dumps(big)},
        managedFields=[{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
    )
    big["status"] = {"phase": "Running"}
    return big


def test_the_cache_keeps_one_copy_of_a_spec() -> None:
    """The parsed spec, the identity and the status: not the raw spec, the last-applied
    annotation or managedFields, each as large again."""
    big = with_schema(100 * 1024)
    cache = Cache()
    key, _ = cache.observe_ftj("ADDED", big)
    entry = cache.ftjs[key]
    assert (
        entry.parsed.spec.evaluation.format.schema_ == big["spec"]["evaluation"]["format"]["schema"]
    )
    assert entry.raw == {
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "ftj-1", "generation": 3},
        "status": {"phase": "Running"},
    }


def test_a_spec_too_large_to_reach_the_trainer_is_refused_unparsed() -> None:
    """A 1 MiB JSON Schema (the API server takes objects up to 1.5 MiB; no CRD rule can size
    a free-form object): SpecTooLarge, naming the field, and nothing of it kept."""
    cache = Cache()
    key, _ = cache.observe_ftj("ADDED", with_schema(1 << 20))
    problem = cache.ftjs[key].parsed
    assert isinstance(problem, Problem), problem
    assert (problem.phase, problem.reason) == ("Failed", Reason.SPEC_TOO_LARGE)
    assert "shorten spec.evaluation.format.schema" in problem.message, problem.message
    assert len(json.dumps(cache.ftjs[key].raw)) + len(problem.message) < 2048


def test_deletion_is_remembered_until_forgotten() -> None:
    cache = Cache()
    cache.observe_ftj("ADDED", FTJ)
    cache.observe_ftj("DELETED", FTJ)
    assert ("team-a", "tune") in cache.deleted and ("team-a", "tune") not in cache.ftjs
    cache.forget(("team-a", "tune"))
    assert ("team-a", "tune") not in cache.deleted


def test_work_queue_coalesces_serialises_and_retries() -> None:
    async def main() -> None:
        handled: list[str] = []
        running: set[str] = set()
        overlaps: list[str] = []
        done = asyncio.Event()
        failures = {"flaky": 1}

        async def handle(key: str) -> None:
            if key in running:
                overlaps.append(key)
            running.add(key)
            await asyncio.sleep(0)  # let other workers run meanwhile
            running.discard(key)
            handled.append(key)
            if failures.get(key):
                failures[key] -= 1
                raise RuntimeError("transient")
            if handled.count("flaky") == 2:
                done.set()

        queue = WorkQueue(handle)
        for key in ("a", "a", "a", "flaky"):
            queue.add(key)
        queue.start(workers=4)
        await asyncio.wait_for(done.wait(), timeout=5)  # the retry comes after 1 s
        await queue.stop()
        assert handled.count("a") == 1  # three adds before it ran: one reconcile
        assert handled.count("flaky") == 2 and overlaps == []

    asyncio.run(main())
