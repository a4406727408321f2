"""Fault: the operator SIGKILLed 5 times at random points while a burst of FineTuneJobs is
created. Control plane only: no trainer runs. The burst mixes every state a job can settle
in without training (suspended, queued for Kueue, unschedulable pods, refused by the
operator's checks), so "every status is right" is checked against four different outcomes.

At the end, with the operator left alone: exactly one Job per FineTuneJob that needs one and
none for those refused (no duplicates, no orphans), every FineTuneJob has a phase, and every
status is what the operator's own pure decision derives from the objects as they are (it
would write nothing more). The kill points come from a seeded RNG: the seed is printed, and
KUBETUNE_FAULT_SEED replays a run.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_faults_operator.py
    KUBETUNE_FAULT_BURST=500 ...   a bigger burst (default 200)
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kubetune.formatting import now_rfc3339
from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import wait_for
from kubetune_operator.__main__ import build_parser, settings_from_args
from kubetune_operator.cache import parse, slim_job, slim_pod
from kubetune_operator.reconcile import Snapshot, decide
from kubetune_operator.settings import OperatorSettings
from tests.fixtures.ftj import FTJ_API, create, ftj_manifest, jobs_of, pods_of
from tests.fixtures.operator import OperatorProcess, install_crd

pytestmark = [pytest.mark.cluster]  # control plane only: nothing trains

BURST = int(os.environ.get("KUBETUNE_FAULT_BURST", "200"))
KILLS = int(os.environ.get("KUBETUNE_FAULT_KILLS", "5"))
SEED = int(os.environ.get("KUBETUNE_FAULT_SEED", str(random.SystemRandom().randrange(10**6))))
# From the last restart until every status is right: the relist and a reconcile of each job.
SETTLE_TIMEOUT = 60 + BURST * 0.5
BUCKET = "burst"

# What each kind of FineTuneJob settles in: (phase, reason, whether it has a Job).
KINDS = {
    "suspended": ("Suspended", "Suspended", True),
    "queued": ("Queued", "WaitingForAdmission", True),
    "unschedulable": ("Pending", "Unschedulable", True),
    "refused": ("Failed", "InsufficientGPUs", False),
}


def kind_of(index: int) -> str:
    return list(KINDS)[index % len(KINDS)]


def burst_manifest(index: int) -> dict:
    kind = kind_of(index)
    name = f"{kind[:5]}-{index:04d}"
    body = ftj_manifest(name, BUCKET)
    spec = body["spec"]
    if kind == "suspended":
        spec["suspend"] = True
    elif kind == "queued":
        body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    elif kind == "unschedulable":
        spec["resources"] = {**spec["resources"], "cpu": "64"}  # the node has 8
    else:  # a 70B model fully fine-tuned on one GPU: refused before any Job
        del spec["lora"]
        spec.update(method="full", resources={**spec["resources"], "gpus": 1})
        spec["model"] = {"uri": f"s3://{BUCKET}/models/llama-70b/"}
    return body


@pytest.fixture
def burst_ns(k8s_cluster: DevCluster) -> Iterator[str]:
    """A namespace for the burst, deleted afterwards without waiting: hundreds of objects go
    away in the background, and the session's cluster goes with the session."""
    api = k8s_cluster.rest()
    name = f"burst-{uuid.uuid4().hex[:8]}"
    api.post(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    try:
        yield name
    finally:
        api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def operator(
    k8s_cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(k8s_cluster)
    op = OperatorProcess(k8s_cluster, tmp_path_factory.mktemp("operator"), trainer_command=["true"])
    op.start()
    try:
        yield op
    finally:
        op.stop()


def operator_settings(op: OperatorProcess) -> OperatorSettings:
    """The settings the operator process runs with (from its own command line)."""
    argv = op.argv()
    return settings_from_args(
        build_parser().parse_args(argv[argv.index("kubetune_operator") + 1 :])
    )


def listed(cluster: DevCluster, ns: str) -> tuple[list[dict], list[dict], list[dict]]:
    ftjs = cluster.rest().get(f"{FTJ_API}/namespaces/{ns}/finetunejobs")["items"]
    return ftjs, jobs_of(cluster, ns), pods_of(cluster, ns)


def controller_uid(obj: dict) -> str | None:
    refs = obj["metadata"].get("ownerReferences") or []
    return next((r["uid"] for r in refs if r.get("controller")), None)


def problems(
    cluster: DevCluster, ns: str, settings: OperatorSettings, *, decided: bool = True
) -> list[str]:
    """Everything wrong with the namespace's FineTuneJobs and Jobs now (empty: all right);
    `decided=False` leaves out the (CPU-heavy) comparison with the operator's decision."""
    ftjs, jobs, pods = listed(cluster, ns)
    found = []
    if len(ftjs) != BURST:
        found.append(f"{len(ftjs)} FineTuneJobs, not {BURST}")
    by_uid = {f["metadata"]["uid"]: f for f in ftjs}
    jobs_by_owner: dict[str, list[dict]] = {}
    for job in jobs:
        owner = controller_uid(job)
        if owner not in by_uid:
            found.append(f"orphan Job {job['metadata']['name']}")
        jobs_by_owner.setdefault(owner, []).append(job)
    now = now_rfc3339()
    for ftj in ftjs:
        name = ftj["metadata"]["name"]
        index = int(name.rsplit("-", 1)[1])
        phase, reason, has_job = KINDS[kind_of(index)]
        st = ftj.get("status") or {}
        own = jobs_by_owner.get(ftj["metadata"]["uid"], [])
        if len(own) != int(has_job):
            found.append(f"{name}: {len(own)} Jobs")
        if (st.get("phase"), st.get("reason")) != (phase, reason):
            found.append(f"{name}: {st.get('phase')}/{st.get('reason')}, not {phase}/{reason}")
        if not decided:
            continue
        job = own[0] if own else None
        job_pods = [
            slim_pod(p) for p in pods if job and controller_uid(p) == job["metadata"]["uid"]
        ]
        snap = Snapshot(
            key=(ns, name),
            ftj=ftj,
            parsed=parse(ftj),
            job=slim_job(job) if job else None,
            pods=job_pods,
        )
        plan = decide(snap, settings, now)
        if plan.status is not None or plan.create_job is not None or plan.set_suspend is not None:
            found.append(f"{name}: the operator would still act: {plan}")
    return found


def units_of_work(jobs: int) -> int:
    """What the operator owes the first `jobs` FineTuneJobs: their Jobs and final phases."""
    return jobs + sum(1 for i in range(jobs) if KINDS[kind_of(i)][2])


def progress(cluster: DevCluster, ns: str) -> int:
    """How far the operator is: Jobs made plus FineTuneJobs with their final phase."""
    ftjs, jobs, _ = listed(cluster, ns)
    settled = sum(
        1
        for f in ftjs
        if (f.get("status") or {}).get("phase")
        == KINDS[kind_of(int(f["metadata"]["name"].rsplit("-", 1)[1]))][0]
    )
    return len(jobs) + settled


def test_operator_killed_five_times_during_a_burst_loses_nothing(
    k8s_cluster: DevCluster, operator: OperatorProcess, burst_ns: str
) -> None:
    ns = burst_ns
    rng = random.Random(SEED)
    print(f"KUBETUNE_FAULT_SEED={SEED} KUBETUNE_FAULT_BURST={BURST}")
    total = units_of_work(BURST)
    # Kill points: random places in the burst. The FineTuneJobs up to a point are created at
    # once (8 clients), then the operator is SIGKILLed while it works through them, and
    # started again; the burst goes on.
    points = sorted(rng.sample(range(1, BURST), KILLS))

    started = time.monotonic()
    kills = []  # (units of work done, units owed for the FineTuneJobs created so far)
    with ThreadPoolExecutor(max_workers=8) as clients:
        for begin, end in zip([0, *points], [*points, BURST], strict=True):
            manifests = [burst_manifest(i) for i in range(begin, end)]
            list(clients.map(lambda m: create(k8s_cluster, ns, m), manifests))
            if end < BURST:
                operator.stop(signal.SIGKILL)
                kills.append((progress(k8s_cluster, ns), units_of_work(end)))
                operator.start()
    created_at = time.monotonic() - started

    settings = operator_settings(operator)
    with contextlib.suppress(TimeoutError):  # what is wrong is reported below
        wait_for(
            lambda: not problems(k8s_cluster, ns, settings, decided=False),
            timeout=SETTLE_TIMEOUT,
            interval=1.0,
            what="every FineTuneJob in its phase with its Job",
        )
        wait_for(
            lambda: not problems(k8s_cluster, ns, settings),
            timeout=30,
            interval=2.0,
            what="every status what the operator derives",
        )
    left = problems(k8s_cluster, ns, settings)
    settled_at = time.monotonic() - started
    print(
        f"burst {BURST}: killed at (units of work done, owed) {kills} of {total}; "
        f"burst created in {created_at:.1f} s, all settled at {settled_at:.1f} s; lost {len(left)}"
    )
    # Each kill interrupted work: the operator had not caught up with the burst.
    assert all(done < owed for done, owed in kills), f"seed {SEED}: a kill with no work left"
    assert left == [], f"seed {SEED}: {len(left)} wrong:\n" + "\n".join(left[:20])
    # The operator is still up after the last restart and never needed help.
    assert operator.proc is not None and operator.proc.poll() is None
    assert operator.starts == KILLS + 1
