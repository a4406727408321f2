"""The status is typed end to end: each phase, derived the real way from hand-made objects,
is a FineTuneJobStatus whose every part forbids unknown keys, and the object as
`kubectl get ftj -o yaml` would show it validates as a whole FineTuneJob."""

from __future__ import annotations

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import contract, crd
from kubetune.api.v1alpha1 import PHASES, FineTuneJob, FineTuneJobStatus
from kubetune_operator import status, validation
from tests.operator.test_builders import make_ftj
from tests.operator.test_status import T0, T1, T2, job_for, pod

CRD_STATUS_SCHEMA = yaml.safe_load(crd.render_crd())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"
]["properties"]["status"]
RESULT = contract.TrainerResult(
    artifacts={"model": "s3://out/adapter/", "manifest": "s3://out/manifest.json"},
    metrics={"trainLoss": 0.5, "evalLoss": 0.7, "tokensTrained": 1000, "evalPassed": True},
    totalSteps=10,
    tracking=[{"backend": "mlflow", "state": "Logged", "run": "http://mlflow/r/1"}],
)
DRY_RUN_RESULT = contract.TrainerResult(
    preview={
        "uri": "s3://out/default/demo/preview.json",
        "trainRows": 90,
        "tokens": 4000,
        "trainedTokens": 1500,
        "excludedRows": 1,
        "excludedExamples": ["train.jsonl: row 7"],
        "stepsPerEpoch": 6,
        "packingEfficiency": 0.91,
    },
    message="s3://out/default/demo/preview.json",
)
PROGRESS = {"step": 4, "totalSteps": 10, "loss": 0.6844789981842041, "updatedAt": T1}


def observed_in_each_phase() -> dict[str, status.Observed]:
    ftj, queued, suspended = make_ftj(), make_ftj(queueName="gpu"), make_ftj(suspend=True)
    running = pod("Running", running=True)
    done = {"exitCode": 0, "reason": "Completed", "message": RESULT.model_dump_json()}
    dry = make_ftj(dryRun=True)
    checked = {"exitCode": 0, "reason": "Completed", "message": DRY_RUN_RESULT.model_dump_json()}
    failed = {"exitCode": 137, "reason": "OOMKilled", "startedAt": T0, "finishedAt": T1}
    return {
        "Pending": status.Observed(ftj=ftj),
        "Queued": status.Observed(ftj=queued, job=job_for(queued, suspend=True)),
        "Suspended": status.Observed(ftj=suspended, job=job_for(suspended, suspend=True)),
        "Running": status.Observed(
            ftj=ftj,
            job=job_for(ftj, startTime=T0, active=1),
            pods=[running],
            progress=PROGRESS,
            gpu_hour_price=2.0,
            changed_fields=["training"],
        ),
        "Succeeded": status.Observed(
            ftj=ftj,
            job=job_for(ftj, conditions=[("Complete", "", "")], startTime=T0, completionTime=T2),
            pods=[pod("Succeeded", terminated=done)],
            progress=PROGRESS,
        ),
        "Failed": status.Observed(
            ftj=ftj,
            job=job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=3),
            pods=[pod("Failed", terminated=failed)],
        ),
        "Validated": status.Observed(
            ftj=dry,
            job=job_for(dry, conditions=[("Complete", "", "")], startTime=T0, completionTime=T2),
            pods=[pod("Succeeded", terminated=checked)],
        ),
    }


@pytest.mark.parametrize("phase", PHASES)
def test_the_status_of_every_phase_validates_against_the_typed_model(phase: str) -> None:
    obs = observed_in_each_phase()[phase]
    derived = status.derive_status(obs, T2)
    assert isinstance(derived, FineTuneJobStatus) and derived.phase == phase
    wire = derived.wire()
    assert FineTuneJobStatus.model_validate(wire) == derived  # round trip, nothing pruned
    # The whole object, as the API server returns it.
    FineTuneJob.model_validate({**obs.ftj.wire(), "status": wire})
    # And the CRD's schema, which the API server checks a status patch against.
    jsonschema.validate(wire, CRD_STATUS_SCHEMA)
    # And once more from that status as the previous one: a second reconcile stays valid.
    again = status.derive_status(status.Observed(**{**obs.__dict__, "previous": wire}), T2)
    assert again.phase == phase


def test_a_problem_before_any_job_is_typed_too() -> None:
    problem = validation.Problem("Failed", "InsufficientGPUs", "needs 1120 GiB")
    derived = status.derive_status(status.Observed(ftj=make_ftj(), problem=problem), T1)
    assert (derived.phase, derived.reason) == ("Failed", "InsufficientGPUs")


@pytest.mark.parametrize(
    "misspelled",
    [
        {"phse": "Running"},
        {"progress": {"stpe": 3}},
        {"usage": {"gpuSecond": 1.0}},
        {"attempts": [{"attempt": 1, "resumedFromstep": 2}]},
        {"conditions": [{"type": "Running", "status": "True", "lastTransition": T0}]},
        {"metrics": {"trainloss": 0.5}},
        {"artifacts": {"adapter": "s3://x/"}},
    ],
)
def test_a_misspelled_key_fails_instead_of_being_pruned(misspelled: dict) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        FineTuneJobStatus.model_validate({"phase": "Running", **misspelled})


def test_display_figures_keep_four_significant_digits() -> None:
    running = status.derive_status(observed_in_each_phase()["Running"], T2)
    assert running.progress is not None and running.progress.loss == 0.6845
    assert status.significant(12345.678) == 12350.0 and status.significant(2e-4) == 2e-4
