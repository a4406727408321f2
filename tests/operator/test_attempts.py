"""status.attempts from hand-made pods and progress: one entry per trainer attempt, with the
step it resumed from, merged level-based with what the status already recorded."""

from __future__ import annotations

import json

from kubetune.api import contract
from kubetune.api.contract import ProgressEvent
from kubetune.api.v1alpha1 import MAX_ATTEMPTS_SHOWN, FineTuneJobStatus
from kubetune_operator import status
from kubetune_operator.cache import Cache
from tests.operator.test_builders import make_ftj
from tests.operator.test_status import job_for

NOW = "2026-01-01T01:00:00Z"


def at(minute: int, second: int = 0) -> str:
    return f"2026-01-01T00:{minute:02d}:{second:02d}Z"


def trainer_pod(
    name: str,
    created: str,
    *,
    started: str | None = None,
    ended: str | None = None,
    exit_code: int | None = None,
    message: str | None = None,
    index: str | None = None,
    deleted: bool = False,
) -> dict:
    state: dict = {}
    phase = "Pending"
    if started and ended is None:
        state, phase = {"running": {"startedAt": started}}, "Running"
    elif started and ended:
        term = {"startedAt": started, "finishedAt": ended, "exitCode": exit_code}
        if message:
            term["message"] = message
        state, phase = {"terminated": term}, "Succeeded" if exit_code == 0 else "Failed"
    meta = {"name": name, "uid": name, "creationTimestamp": created}
    if index is not None:
        meta["labels"] = {status.COMPLETION_INDEX_LABEL: index}
    if deleted:
        meta["deletionTimestamp"] = ended or created
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "trainer", "state": state}] if state else [],
        },
    }


def starts(*events: tuple[str, int]) -> dict:
    return {contract.PROGRESS_STARTS: [{"at": t, "step": s} for t, s in events]}


def attempts(pods, *, progress=None, prev=None, job=None, ftj=None) -> list[dict]:
    ftj = ftj or make_ftj()
    obs = status.Observed(
        ftj=ftj,
        previous={"attempts": prev} if prev else {},
        job=job if job is not None else job_for(ftj, active=1),
        pods=list(pods),
        progress=progress,
    )
    return status.attempts_of(obs, NOW)


def test_three_killed_attempts_and_the_running_fourth_each_with_its_resume_step() -> None:
    pods = [
        trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137),
        trainer_pod("p2", at(2, 10), started=at(2, 12), ended=at(4), exit_code=137),
        trainer_pod("p3", at(4, 30), started=at(4, 31), ended=at(6), exit_code=137),
        trainer_pod("p4", at(7), started=at(7, 2)),
    ]
    # The trainer's events, stamped by the same node clock, in milliseconds.
    progress = starts(
        ("2026-01-01T00:00:20.125Z", 0),
        ("2026-01-01T00:02:30.5Z", 8),
        ("2026-01-01T00:04:50.001Z", 16),
        ("2026-01-01T00:07:02.900Z", 24),
    )
    got = attempts(pods, progress=progress)
    assert [(a["attempt"], a["pod"], a["result"], a.get("resumedFromStep")) for a in got] == [
        (1, "p1", "Failed", 0),
        (2, "p2", "Failed", 8),
        (3, "p3", "Failed", 16),
        (4, "p4", "Running", 24),
    ]
    assert got[0]["startedAt"] == at(0, 5) and got[0]["endedAt"] == at(2)
    assert got[0]["exitCode"] == 137 and got[0]["reason"] == contract.Reason.TRAINER_FAILED
    assert "endedAt" not in got[3]
    FineTuneJobStatus.model_validate({"attempts": got})  # the CRD's shape


def test_recorded_attempts_survive_their_pods_and_an_operator_restart() -> None:
    first = attempts(
        [trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137)],
        progress=starts((at(0, 20), 0)),
    )
    # The failed pod is gone and the operator restarted (no progress remembered): what the
    # status recorded stays, the new pod is attempt 2.
    later = attempts(
        [trainer_pod("p2", at(2, 10), started=at(2, 12))],
        prev=first,
        progress=starts((at(2, 30), 6)),
    )
    assert [(a["attempt"], a["pod"], a["resumedFromStep"]) for a in later] == [
        (1, "p1", 0),
        (2, "p2", 6),
    ]
    assert later[0] == first[0]


def test_a_resume_event_waits_for_its_pod_instead_of_landing_on_the_ended_attempt() -> None:
    ended = trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137)
    progress = starts((at(0, 20), 0), (at(2, 40), 4))
    # The second pod's Running state is not in the cache yet; its trainer already pushed.
    got = attempts([ended], progress=progress)
    assert [a.get("resumedFromStep") for a in got] == [0]
    got = attempts([ended, trainer_pod("p2", at(2, 10), started=at(2, 12))], progress=progress)
    assert [a.get("resumedFromStep") for a in got] == [0, 4]


def test_a_deleted_pod_is_closed_only_once_a_newer_attempt_shows_it_is_over() -> None:
    running = attempts([trainer_pod("p1", at(0), started=at(0, 5))])
    assert running[0]["result"] == "Running"
    # Right after an operator restart the pods may not be listed yet: nothing is guessed.
    assert attempts([], prev=running) == running
    got = attempts([trainer_pod("p2", at(3), started=at(3, 2))], prev=running)
    assert got[0]["result"] == "Failed" and got[0]["reason"] == contract.Reason.POD_DELETED
    assert got[0]["endedAt"] == NOW and got[1]["result"] == "Running"
    # Its pod turns up after all (listed late): what the pod says replaces the guess.
    ended = trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137)
    seen = attempts([ended, trainer_pod("p2", at(3), started=at(3, 2))], prev=got)
    assert seen[0]["endedAt"] == at(2) and seen[0]["reason"] == contract.Reason.TRAINER_FAILED


def test_a_pod_deleted_while_running_says_so() -> None:
    pod = trainer_pod("p1", at(0), started=at(0, 5), ended=at(1), exit_code=143, deleted=True)
    (got,) = attempts([pod])
    assert got["result"] == "Failed" and got["reason"] == contract.Reason.POD_DELETED


def test_a_suspension_stops_the_attempt_and_the_result_gives_the_resume_step() -> None:
    ftj = make_ftj()
    running = attempts([trainer_pod("p1", at(0), started=at(0, 5))], ftj=ftj)
    stopped = attempts([], prev=running, ftj=ftj, job=job_for(ftj, suspend=True))
    assert stopped[0]["result"] == "Stopped" and stopped[0]["reason"] == "Suspended"
    result = json.dumps({"result": "succeeded", "resumedFromStep": 12, "totalSteps": 20})
    done = trainer_pod("p2", at(5), started=at(5, 1), ended=at(6), exit_code=0, message=result)
    got = attempts([done], prev=stopped, ftj=ftj)
    assert got[1] == {
        "attempt": 2,
        "pod": "p2",
        "startedAt": at(5, 1),
        "endedAt": at(6),
        "exitCode": 0,
        "result": "Succeeded",
        "resumedFromStep": 12,
    }


def test_a_gang_counts_rank_zeros_pods_only() -> None:
    pods = [
        trainer_pod("g0", at(0), started=at(0, 1), index="0"),
        trainer_pod("g1", at(0), started=at(0, 1), index="1"),
    ]
    assert [a["pod"] for a in attempts(pods)] == ["g0"]


def test_the_list_keeps_the_newest_attempts_and_numbers_on() -> None:
    prev = [
        {"attempt": n, "pod": f"old{n}", "result": "Failed", "endedAt": at(0)}
        for n in range(1, MAX_ATTEMPTS_SHOWN + 1)
    ]
    got = attempts([trainer_pod("new", at(5), started=at(5, 1))], prev=prev)
    assert len(got) == MAX_ATTEMPTS_SHOWN
    assert got[0]["attempt"] == 2 and got[-1] == {
        "attempt": MAX_ATTEMPTS_SHOWN + 1,
        "pod": "new",
        "startedAt": at(5, 1),
        "result": "Running",
    }


def test_attempts_ride_on_the_status_and_alone_wait_for_the_progress_interval() -> None:
    ftj = make_ftj()
    job = job_for(ftj, failed=1, active=1, startTime=at(0))
    pods = [
        trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137),
        trainer_pod("p2", at(2, 10), started=at(2, 12)),
    ]
    obs = status.Observed(ftj=ftj, job=job, pods=pods, progress=starts((at(2, 30), 6)))
    st = status.derive_status(obs, NOW).wire()
    assert [a["resumedFromStep"] for a in st["attempts"][1:]] == [6]
    assert st["restarts"] == 1 and st["resumedFromStep"] == 6
    before = {**st, "attempts": st["attempts"][:1] + [{**st["attempts"][1]}]}
    del before["attempts"][1]["resumedFromStep"]
    assert not status.needs_immediate_patch(before, st)


def test_a_late_push_or_a_checkpoint_report_does_not_move_progress_back() -> None:
    cache = Cache()
    key = ("team-a", "tune")
    cache.observe_ftj("ADDED", {"metadata": {"namespace": key[0], "name": key[1], "uid": "u"}})
    resumed = ProgressEvent(event="resumed", time="2026-01-01T00:00:01.000Z", resumedFromStep=8)
    assert cache.observe_progress(key, resumed)
    assert cache.observe_progress(key, ProgressEvent(event="step", time=at(0, 3), step=43))
    # Step 42's push was held up (its token review slow) and is handled after step 43's.
    late = ProgressEvent(event="step", time="2026-01-01T00:00:02.500Z", step=42)
    assert not cache.observe_progress(key, late)
    assert cache.progress[key]["step"] == 43 and cache.progress[key]["updatedAt"] == at(0, 3)
    # The checkpoint of step 42, reported once its upload finished, is no progress either.
    upload = ProgressEvent(event="checkpoint", time=at(0, 4), step=42, totalSteps=60)
    assert cache.observe_progress(key, upload)
    assert cache.progress[key]["step"] == 43 and cache.progress[key]["totalSteps"] == 60
    # A start still counts for status.attempts, whenever it arrives.
    assert cache.observe_progress(key, resumed)
    assert len(cache.progress[key][contract.PROGRESS_STARTS]) == 2


def test_a_suspended_pod_that_saved_its_step_and_was_deleted_before_a_reconcile_is_preempted() -> (
    None
):
    """The Job controller deletes a suspended Job's pod: it ends (exit 5, its step saved) and is
    gone before the next reconcile. Its last state, from the deletion event, tells how it ended."""
    from kubetune_operator import names

    ftj = make_ftj()
    job = job_for(ftj, suspend=True)
    cache = Cache()
    cache.observe_job("MODIFIED", job)
    running = trainer_pod("p1", at(0), started=at(0, 5))
    ended = trainer_pod("p1", at(0), started=at(0, 5), ended=at(1), exit_code=5, deleted=True)
    for pod in (running, ended):
        pod["metadata"]["namespace"] = job["metadata"]["namespace"]
        pod["metadata"]["labels"] = {names.POD_JOB_LABELS[0]: job["metadata"]["name"]}
        pod["metadata"]["ownerReferences"] = [{"uid": job["metadata"]["uid"]}]
    cache.observe_pod("ADDED", running)
    recorded = status.attempts_of(status.Observed(ftj=ftj, job=job, pods=cache.job_pods(job)), NOW)
    assert recorded[0]["result"] == "Running"
    cache.observe_pod("MODIFIED", ended)
    cache.observe_pod("DELETED", ended)
    obs = status.Observed(
        ftj=ftj,
        previous={"attempts": recorded},
        job=job,
        pods=cache.job_pods(job),
        ended_pods=cache.ended_job_pods(job),
    )
    assert obs.pods == []
    (got,) = status.attempts_of(obs, NOW)
    assert (got["result"], got["reason"], got["exitCode"]) == ("Stopped", "Preempted", 5)
    assert got["endedAt"] == at(1)
    # Once the Job is gone, so is what was kept of its pods.
    cache.observe_job("DELETED", job)
    assert cache.ended_job_pods(job) == []
