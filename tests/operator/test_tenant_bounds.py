"""What a tenant's FineTuneJob cannot get from the operator, whatever admission let through:
an image the platform did not list, a cached private image, a gang reachable by other pods."""

from __future__ import annotations

import pytest

from kubetune.api.contract import Reason
from kubetune.kube import path_for
from kubetune_operator import builders, names, validation
from kubetune_operator.reconcile import decide
from kubetune_operator.settings import OperatorSettings
from tests.operator.test_builders import SETTINGS, make_ftj
from tests.operator.test_reconcile import NOW, ftj_object, snapshot

LISTED = OperatorSettings(
    trainer_image="registry.example/trainer:1",
    trainer_allowed_images=["registry.example/ml/", "other.example/t@sha256:" + "a" * 64],
)


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example/trainer:1", True),  # the chart's own trainer
        ("registry.example/ml/custom:2", True),  # under a listed prefix
        ("other.example/t@sha256:" + "a" * 64, True),  # a listed digest
        ("registry.example/ml-evil/x:1", False),  # a prefix is a path, not a string start
        ("other.example/t@sha256:" + "b" * 64, False),
        ("other.example/t:latest", False),
        ("evil.example/kubetune-trainer:1", False),
    ],
)
def test_only_listed_images_are_allowed(image: str, allowed: bool) -> None:
    assert validation.image_allowed(image, LISTED) is allowed


def test_by_default_only_the_trainer_image_is_allowed() -> None:
    assert (
        validation.check_image(make_ftj(image="registry.example/trainer:1").spec, SETTINGS) is None
    )
    problem = validation.check_image(make_ftj(image="evil.example/x:1").spec, SETTINGS)
    assert problem is not None
    assert (problem.phase, problem.reason) == ("Failed", Reason.IMAGE_NOT_ALLOWED)
    assert "spec.image: evil.example/x:1" in problem.message
    assert "registry.example/trainer:1" in problem.message  # what is allowed instead


def test_an_unlisted_image_fails_at_once_without_a_job() -> None:
    plan = decide(snapshot(ftj_object(image="evil.example/x:1")), OperatorSettings(), NOW)
    assert plan.create_job is None
    assert plan.status is not None
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "ImageNotAllowed")


def test_a_jobs_own_image_is_always_pulled() -> None:
    """So the registry checks this namespace's pull credentials: another team's private
    image cached on the node opens nothing."""

    def pull_policy(**spec: object) -> str:
        job = builders.build_job(make_ftj(**spec), SETTINGS)
        return job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"]

    assert pull_policy(image="registry.example/ml/custom:2") == "Always"
    assert pull_policy() == "IfNotPresent"  # the platform's own image


def test_a_gang_admits_only_its_own_pods() -> None:
    ftj = make_ftj(resources={"gpus": 1, "nodes": 2})
    job = builders.build_job(ftj, SETTINGS)
    policy = builders.build_gang_network_policy(job)
    assert policy is not None
    same_job = {"matchLabels": {names.POD_JOB_LABELS[0]: job["metadata"]["name"]}}
    assert policy["spec"] == {
        "podSelector": same_job,
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": same_job}]}],
    }
    # Owned like the Job, so it goes with the FineTuneJob; labelled as the operator's own.
    assert policy["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert policy["metadata"]["labels"][names.LABEL_MANAGED_BY] == names.MANAGER
    assert policy["metadata"]["namespace"] == job["metadata"]["namespace"]
    # Where the controller posts it, with the gang's Service, before the Job.
    assert path_for(policy) == "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies"


def test_one_pod_needs_no_gang_policy() -> None:
    job = builders.build_job(make_ftj(resources={"gpus": 2}), SETTINGS)
    assert builders.build_gang_network_policy(job) is None
