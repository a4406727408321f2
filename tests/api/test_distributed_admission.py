"""spec.resources.nodes and spec.distributed.strategy: refused at admission (a real API server,
server-side dry run) and by the pydantic model `kubetune run` uses, naming the field; and the
resolved world size and strategy."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api import v1alpha1 as api
from kubetune.api.errors import describe_validation_error
from tests.api.test_admission import BASE, dry_run_create, malformed

# (case id, {dotted path under spec: new value}, text the refusal must contain)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("nodes-zero", {"resources.nodes": 0}, "spec.resources.nodes"),
    ("nodes-too-many", {"resources.nodes": 65}, "spec.resources.nodes"),
    ("nodes-not-int", {"resources.nodes": "2"}, "spec.resources.nodes"),
    ("strategy-unknown", {"distributed": {"strategy": "deepspeed"}}, "spec.distributed.strategy"),
    ("strategy-extra-field", {"distributed": {"zeroStage": 3}}, "spec.distributed"),
    (
        "qlora-fsdp",
        {"method": "qlora", "distributed": {"strategy": "fsdp"}, "resources.nodes": 2},
        "use ddp (or auto)",
    ),
]  # fmt: skip

ADMITTED: list[tuple[str, dict[str, Any]]] = [
    ("multi-node-full", {"method": "full", "resources": {"nodes": 4, "gpus": 8}}),
    ("cpu-gang", {"resources": {"nodes": 2, "gpus": 0}, "distributed": {"strategy": "ddp"}}),
    ("qlora-multi-gpu", {"method": "qlora", "resources": {"gpus": 4}}),
]


@pytest.mark.parametrize(("case_id", "changes", "text"), CASES, ids=[c[0] for c in CASES])
def test_local_validation_refuses(case_id: str, changes: dict[str, Any], text: str) -> None:
    with pytest.raises(ValidationError) as error:
        api.FineTuneJob.model_validate(malformed(changes))
    message = describe_validation_error(error.value, "job.yaml")
    assert "\n" not in message
    assert text in message, message


@pytest.mark.parametrize(
    ("method", "gpus", "nodes", "chosen", "world", "strategy"),
    [
        ("lora", 1, 1, "auto", 1, "none"),
        ("full", 0, 1, "fsdp", 1, "none"),  # one process: nothing to distribute
        ("lora", 8, 1, "auto", 8, "ddp"),
        ("qlora", 2, 2, "auto", 4, "ddp"),
        ("full", 8, 2, "auto", 16, "fsdp"),
        ("full", 0, 3, "auto", 3, "fsdp"),  # CPU workers: one process per node
        ("full", 4, 1, "ddp", 4, "ddp"),
        ("lora", 2, 1, "fsdp", 2, "fsdp"),
    ],
)
def test_world_size_and_strategy(
    method: str, gpus: int, nodes: int, chosen: str, world: int, strategy: str
) -> None:
    spec = malformed(
        {
            "method": method,
            "resources": {"gpus": gpus, "nodes": nodes},
            "distributed": {"strategy": chosen},
        }
    )["spec"]
    parsed = api.FineTuneJobSpec.model_validate(spec)
    assert (parsed.world_size, parsed.strategy) == (world, strategy)


@pytest.fixture(scope="module")
def admission(k8s_cluster: Any) -> Any:
    from tests.fixtures.operator import install_crd

    install_crd(k8s_cluster)
    return k8s_cluster


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "changes", "text"), CASES, ids=[c[0] for c in CASES])
def test_the_api_server_refuses(admission: Any, case_id: str, changes: dict, text: str) -> None:
    allowed, error = dry_run_create(admission, malformed(changes))
    assert not allowed, f"{case_id} was admitted"
    assert text in error, error


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "changes"), ADMITTED, ids=[c[0] for c in ADMITTED])
def test_the_api_server_admits(admission: Any, case_id: str, changes: dict) -> None:
    manifest = malformed(changes)
    allowed, error = dry_run_create(admission, manifest)
    assert allowed, error
    api.FineTuneJob.model_validate(manifest)


def test_base_is_single_process() -> None:
    assert api.FineTuneJob.model_validate(BASE).spec.world_size == 1
