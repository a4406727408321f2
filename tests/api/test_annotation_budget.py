"""Every FineTuneJob the API server admits fits the pod annotation that carries it to the
trainer: the worst case of the CRD's bounds (maxLength, maxItems, the CEL budget of the long
strings) is computed from the generated schema, so a new unbounded field fails here."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetune.api import contract, crd
from kubetune.api import v1alpha1 as api

# JSON escapes a control character as \\u00XX: six bytes for one character of maxLength.
BYTES_PER_CHAR = 6
INT64_DIGITS = len(str(-(2**63)))
FLOAT_CHARS = len(repr(-1.7976931348623157e308))
# The fields the schema cannot bound (free-form JSON Schema documents): the operator
# measures the job before creating its Job instead (validation.check_size).
UNBOUNDED_BY_DESIGN = {"spec.evaluation.format.schema", "spec.rewards[].schema"}
LONG_TEXT = {f"spec.{path}" for path in api.LONG_TEXT_FIELDS}


class Unbounded(Exception):
    pass


def worst_case(node: dict[str, Any], path: str, unbounded: list[str]) -> int:
    """Most bytes a value valid for `node` takes as compact JSON (ensure_ascii=False)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        unbounded.append(path)
        return 0
    if "enum" in node:
        return max(len(json.dumps(v, ensure_ascii=False)) for v in node["enum"])
    kind = node.get("type")
    if kind == "string":
        if path in LONG_TEXT:
            return 2  # its characters are in the shared budget
        if "maxLength" not in node:
            unbounded.append(path)
            return 0
        return 2 + BYTES_PER_CHAR * node["maxLength"]
    if kind == "integer":
        bounds = [node.get("minimum"), node.get("maximum")]
        return max(len(str(b)) for b in bounds) if None not in bounds else INT64_DIGITS
    if kind == "number":
        return FLOAT_CHARS
    if kind == "boolean":
        return len("false")
    if kind == "array":
        if "maxItems" not in node:
            unbounded.append(path)
            return 0
        return 2 + node["maxItems"] * (worst_case(node["items"], f"{path}[]", unbounded) + 1)
    if kind == "object" and "properties" in node:
        return 2 + sum(
            len(json.dumps(name)) + 1 + worst_case(child, f"{path}.{name}", unbounded) + 1
            for name, child in node["properties"].items()
        )
    unbounded.append(path)
    return 0


def spec_schema() -> dict[str, Any]:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    # Placement, image and priority class stay on the pod: the trainer's copy leaves them out
    # (builders.trainer_document).
    properties = {k: v for k, v in spec["properties"].items() if k not in api.NOT_IN_TRAINER_COPY}
    return {**spec, "properties": properties}


def test_the_largest_admissible_job_fits_the_annotation_budget() -> None:
    unbounded: list[str] = []
    spec = worst_case(spec_schema(), "spec", unbounded)
    assert sorted(unbounded) == sorted(UNBOUNDED_BY_DESIGN), "bound these fields in v1alpha1.py"
    envelope = json.dumps(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "n" * 253, "namespace": "n" * 63},  # DNS names: ASCII
            "spec": None,
        },
        separators=(",", ":"),
    )
    long_text = BYTES_PER_CHAR * api.LONG_TEXT_BUDGET
    total = len(contract.JOB_ANNOTATION) + len(envelope) - len("null") + spec + long_text
    assert total <= contract.JOB_ANNOTATION_BUDGET < contract.ANNOTATION_SIZE_LIMIT, total


def long_text_spec(characters: int) -> dict[str, Any]:
    return {
        "model": {"uri": "hf://org/model"},
        "dataset": {"uri": "s3://data/train.jsonl", "chatTemplate": "x" * characters},
        "output": {"uri": "s3://out/"},
    }


def test_the_models_refuse_long_strings_over_the_budget_like_the_api_server() -> None:
    fits = api.LONG_TEXT_BUDGET - len("hf://org/model") - len("s3://data/train.jsonl") - 9
    api.FineTuneJobSpec.model_validate(long_text_spec(fits))
    with pytest.raises(ValueError, match="must stay under 24576 characters"):
        api.FineTuneJobSpec.model_validate(long_text_spec(fits + 1))


@pytest.mark.cluster
def test_the_api_server_refuses_a_job_too_large_for_the_trainers_annotation(k8s_cluster) -> None:
    from tests.fixtures.operator import install_crd

    install_crd(k8s_cluster)
    fits = api.LONG_TEXT_BUDGET - len("hf://org/model") - len("s3://data/train.jsonl") - 9
    for characters, admitted in ((fits, True), (fits + 1, False)):
        manifest = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "big", "namespace": "default"},
            "spec": long_text_spec(characters),
        }
        result = k8s_cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest), check=False
        )
        assert (result.returncode == 0) is admitted, result.stderr
        if not admitted:
            assert "must stay under 24576 characters" in result.stderr
