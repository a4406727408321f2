"""A FineTuneJob with world size above 1 as Kubernetes objects: one pod running torchrun over
its GPUs, or an Indexed Job (one pod per node) plus a headless Service for the rendezvous."""

from __future__ import annotations

from kubetune.api import contract
from kubetune_operator import builders, names, status
from tests.operator.test_builders import SETTINGS, env_of, make_ftj
from tests.operator.test_status import derive, job_for, pod


def test_one_gpu_is_not_a_gang() -> None:
    job = builders.build_job(make_ftj(resources={"gpus": 1}), SETTINGS)
    assert not [name for name in env_of(job) if name.startswith("PET_")]
    assert "completionMode" not in job["spec"]
    assert builders.build_service(job) is None


def test_several_gpus_run_torchrun_in_one_pod() -> None:
    job = builders.build_job(make_ftj(resources={"gpus": 4}), SETTINGS)
    env = env_of(job)
    assert env[contract.ENV_NPROC_PER_NODE]["value"] == "4"
    assert env[contract.ENV_NNODES]["value"] == "1"
    assert env[contract.ENV_MASTER_ADDR]["value"] == "127.0.0.1"
    assert "completionMode" not in job["spec"] and builders.build_service(job) is None
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"


def test_nodes_make_an_indexed_job_and_a_headless_service() -> None:
    ftj = make_ftj(name="big", method="full", resources={"gpus": 8, "nodes": 4})
    job = builders.build_job(ftj, SETTINGS)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    service_name = names.service_name("big")
    assert spec["template"]["spec"]["subdomain"] == service_name
    env = env_of(job)
    assert env[contract.ENV_NNODES]["value"] == "4"
    assert env[contract.ENV_NPROC_PER_NODE]["value"] == "8"
    # Index 0's stable name: <job>-0.<service>.<namespace>.svc
    master = f"{names.job_name('big')}-0.{service_name}.team-a.svc"
    assert env[contract.ENV_MASTER_ADDR]["value"] == master
    assert env[contract.ENV_MASTER_PORT]["value"] == str(contract.GANG_PORT)
    # Each pod's node rank is its completion index, which the Job controller writes on it.
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env[contract.ENV_NODE_RANK] == {
        "name": "PET_NODE_RANK",
        "valueFrom": {"fieldRef": {"fieldPath": index}},
    }

    service = builders.build_service(job)
    assert service is not None and service["metadata"]["name"] == service_name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # rendezvous before readiness
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["metadata"]["ownerReferences"] == [names.owner_reference(ftj)]


def test_cpu_gang_one_process_per_node() -> None:
    job = builders.build_job(make_ftj(resources={"gpus": 0, "nodes": 2}), SETTINGS)
    env = env_of(job)
    assert env[contract.ENV_NPROC_PER_NODE]["value"] == "1"
    assert job["spec"]["completions"] == 2
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def _pod(name: str, finished: str, message: str | None) -> dict:
    terminated = {"exitCode": 0, "finishedAt": finished}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": names.TRAINER_CONTAINER, "state": {"terminated": terminated}}
            ],
        },
    }


def test_the_result_comes_from_rank_0_pod_even_when_another_ends_last() -> None:
    ftj = make_ftj(resources={"gpus": 0, "nodes": 2})
    job = builders.build_job(ftj, SETTINGS)
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    result = contract.TrainerResult(result="succeeded", totalSteps=12)
    pods = [
        _pod("index-0", "2026-01-01T00:10:00Z", result.model_dump_json(exclude_none=True)),
        _pod("index-1", "2026-01-01T00:10:05Z", None),  # waited for rank 0, no message
    ]
    outcome = status.job_outcome(ftj, job, pods)
    assert outcome.phase == "Succeeded"
    assert outcome.result is not None and outcome.result.totalSteps == 12


def test_status_shows_world_size_and_effective_batch() -> None:
    ftj = make_ftj(
        resources={"gpus": 4, "nodes": 2},
        training={"batchSize": 2, "gradientAccumulationSteps": 8},
    )
    assert (ftj.spec.world_size, ftj.spec.effective_batch_size) == (8, 2 * 8 * 8)


def test_backoff_limit_counts_gang_retries_not_pods() -> None:
    """One failure of a gang fails each of its pods; the Job counts pods, spec.backoffLimit
    counts retries of the trainer: the Job's limit is spec.backoffLimit x nodes."""
    gang = builders.build_job(make_ftj(backoffLimit=2, resources={"gpus": 0, "nodes": 3}), SETTINGS)
    assert gang["spec"]["backoffLimit"] == 6
    one_pod = builders.build_job(make_ftj(backoffLimit=2, resources={"gpus": 4}), SETTINGS)
    assert one_pod["spec"]["backoffLimit"] == 2


def test_restarts_count_gang_attempts() -> None:
    ftj = make_ftj(backoffLimit=2, resources={"gpus": 0, "nodes": 2})
    # Both pods of the first attempt failed; the second attempt runs.
    job = job_for(ftj, failed=2, active=2)
    running = [pod("Running", running=True, name=f"r{i}") for i in range(2)]
    st = derive(ftj, job, [pod("Failed", terminated={"exitCode": 137}), *running])
    assert st["restarts"] == 1
    # Three attempts failed (the Job stopped at the 5th pod, over its limit of 2 x 2).
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=5)
    crashed = {"exitCode": 1, "reason": "Error", "message": "RuntimeError: boom"}
    st = derive(ftj, job, [pod("Failed", terminated=crashed)])
    assert "failed 3 time(s)" in st["message"] and st["restarts"] == 2, st


def test_the_gang_gets_torchruns_own_environment() -> None:
    """torchrun's own PET_* variables (each `torchrun --foo-bar` flag defaults to PET_FOO_BAR;
    Kubeflow's torch plugin sets them alike) are the one channel of the gang's shape: the
    static rendezvous with its timeout, no elastic restarts, and no kubetune variables."""
    env = env_of(builders.build_job(make_ftj(resources={"gpus": 2, "nodes": 3}), SETTINGS))
    torchrun = {name: entry.get("value") for name, entry in env.items() if name.startswith("PET_")}
    assert torchrun == {
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": None,  # each pod's own: a fieldRef (test above)
        "PET_MASTER_ADDR": f"{names.job_name('tune')}-0.{names.service_name('tune')}.team-a.svc",
        "PET_MASTER_PORT": str(contract.GANG_PORT),
        "PET_RDZV_BACKEND": "static",
        "PET_RDZV_CONF": f"timeout={contract.RENDEZVOUS_TIMEOUT_S}",
        "PET_MAX_RESTARTS": "0",
    }
    assert not [name for name in env if name.startswith("KUBETUNE_") and "RANK" in name]
    old = {"KUBETUNE_NNODES", "KUBETUNE_NPROC_PER_NODE", "KUBETUNE_MASTER_ADDR"}
    assert not old & set(env) and "KUBETUNE_RENDEZVOUS_TIMEOUT_S" not in env
