"""The API types: defaults, cross-field rules, and the generated CRD staying in sync."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import crd
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec

MINIMAL_SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
    "dataset": {"uri": "s3://datasets/support/train.jsonl"},
    "output": {"uri": "s3://ft-artifacts/team-a/"},
}


def spec(**overrides) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**MINIMAL_SPEC, **overrides})


def test_documented_defaults():
    s = spec()
    assert s.method == "lora"
    assert (s.lora.r, s.lora.effective_alpha, s.lora.dropout) == (16, 32, 0.05)
    assert s.lora.targetModules == ["all-linear"]  # fits every architecture
    t = s.training
    assert (t.learningRate, t.epochs, t.batchSize, t.gradientAccumulationSteps) == (2e-4, 3, 4, 4)
    assert (t.maxSeqLength, t.packing, t.seed) == (2048, True, 42)
    assert (t.trainOnPrompt, s.dataset.promptTemplate) == (False, "auto")
    assert spec(method="full").training.learningRate == 2e-5  # method-dependent default
    assert s.dataset.validationSplit == 0.05
    assert s.quantization is None
    assert s.backoffLimit == 2


def test_alpha_defaults_to_twice_r():
    assert spec(lora={"r": 8}).lora.effective_alpha == 16
    assert spec(lora={"r": 8, "alpha": 8}).lora.effective_alpha == 8


def test_qlora_defaults_to_nf4_double_quant_bf16():
    q = spec(method="qlora").quantization
    assert (q.bits, q.quantType, q.doubleQuant, q.computeDtype) == (4, "nf4", True, "bfloat16")


def test_full_has_no_adapter():
    assert spec(method="full").lora is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quantization": {"bits": 4}}, "quantization is only valid with method: qlora"),
        ({"method": "full", "lora": {"r": 8}}, "lora settings are not valid with method: full"),
        ({"training": {"learningRate": -1}}, "greater than 0"),
        ({"model": {"uri": "ftp://x/y"}}, "should match pattern"),
        ({"dataset": {"uri": "s3://b/x.jsonl", "format": "sharegpt"}}, "'auto'"),
        ({"training": {"learningrate": 1e-4}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_rejected(overrides, message):
    with pytest.raises(ValidationError) as err:
        spec(**overrides)
    assert message in str(err.value)


def test_manifest_round_trip_keeps_field_names():
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "support-lora", "namespace": "team-a"},
            "spec": {
                **MINIMAL_SPEC,
                "evaluation": {"format": {"type": "jsonSchema", "schema": {"type": "object"}}},
            },
        }
    )
    wire = job.wire()
    assert wire["spec"]["evaluation"]["format"]["schema"] == {"type": "object"}
    assert wire["spec"]["training"]["learningRate"] == 2e-4
    assert FineTuneJob.model_validate(wire) == job


def test_crd_file_matches_the_models():
    assert crd.CRD_PATH.read_text() == crd.render_crd(), (
        "crds/ is stale: run python -m kubetune.api.crd"
    )


def _walk(node, path=""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural():
    doc = yaml.safe_load(crd.render_crd())
    version = doc["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "$ref" not in node and "anyOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"] == ["ftj"]
    spec_schema = root["properties"]["spec"]
    assert spec_schema["required"] == ["dataset", "model", "output"]
    assert spec_schema["properties"]["method"]["enum"] == ["full", "lora", "qlora"]
    assert spec_schema["properties"]["training"]["default"] == {}
    assert "default" not in spec_schema["properties"]["lora"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Phase", "Method", "Model", "Progress", "Loss", "Age",
    ]  # fmt: skip
    # `-o wide` adds what the job used.
    assert [c["name"] for c in columns if c.get("priority")] == ["GPU-Seconds", "Cost", "Restarts"]
    assert {r["fieldPath"] for r in root["x-kubernetes-validations"]} == {
        ".spec.model", ".spec.method", ".spec.dataset",
    }  # fmt: skip
