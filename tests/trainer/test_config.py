"""Loading the FineTuneJob manifest, and how bad input is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api.errors import field_path
from kubetune_trainer.config import load_job
from kubetune_trainer.errors import BadInputError, termination_log_path, write_termination_message

MANIFEST = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "model": {"uri": "hf://org/tiny"},
        "dataset": {"uri": "file:///data/train.jsonl"},
        "output": {"uri": "s3://artifacts/runs/"},
    },
}


def write_manifest(tmp_path: Path, spec_changes: dict, name: str = "job.yaml") -> Path:
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["spec"].update(spec_changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(manifest) if name.endswith(".yaml") else json.dumps(manifest))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(BadInputError) as caught:
        load_job(path)
    return str(caught.value)


def test_yaml_manifest_loads_with_method_defaults(tmp_path: Path) -> None:
    job = load_job(write_manifest(tmp_path, {"method": "qlora"}))
    assert job.metadata.name == "demo"
    assert job.namespace == "ml"
    assert job.spec.lora is not None and job.spec.lora.effective_alpha == 32
    assert job.spec.quantization is not None and job.spec.quantization.quantType == "nf4"


def test_json_manifest_loads(tmp_path: Path) -> None:
    job = load_job(write_manifest(tmp_path, {"training": {"epochs": 1}}, name="job.json"))
    assert job.spec.training.epochs == 1


def test_out_of_range_value_names_the_field(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, {"training": {"learningRate": 0}})
    assert (
        load_error(path) == "job.yaml: spec.training.learningRate: Input should be greater than 0"
    )


def test_several_errors_share_one_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, {"training": {"learningRate": -1, "batchsize": 3}})
    message = load_error(path)
    assert "\n" not in message
    assert message == (
        "job.yaml: spec.training.learningRate: Input should be greater than 0; "
        "spec.training.batchsize: Extra inputs are not permitted"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"method": "lora", "quantization": {"bits": 4}},
            "job.yaml: spec.quantization is only valid with method: qlora",
        ),
        (
            {"method": "full", "lora": {"r": 8}},
            "job.yaml: spec.lora settings are not valid with method: full",
        ),
    ],
)
def test_contradictory_settings(tmp_path: Path, changes: dict, expected: str) -> None:
    assert load_error(write_manifest(tmp_path, changes)) == expected


def test_list_items_are_indexed_in_the_path(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, {"tolerations": ["not-an-object"]})
    assert load_error(path) == "job.yaml: spec.tolerations[0]: Input should be a valid dictionary"
    assert field_path(("spec", "imagePullSecrets", 2, "name")) == "spec.imagePullSecrets[2].name"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("spec:\n  model: [unclosed\n")
    message = load_error(path)
    assert message.startswith("job.yaml: invalid YAML at line 3 column 1:")
    assert "\n" not in message


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"spec": {\n  "model": }\n}')
    assert load_error(path) == "job.json: invalid JSON at line 2 column 12: Expecting value"


def test_empty_and_non_mapping_manifests(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("")
    assert load_error(path) == "job.yaml: expected a FineTuneJob manifest (a mapping), got empty"
    path.write_text("- a\n- b\n")
    assert load_error(path) == "job.yaml: expected a FineTuneJob manifest (a mapping), got a list"


def test_missing_file(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: file not found"


def test_bad_input_error_is_one_line() -> None:
    assert str(BadInputError("train.jsonl:\n  row 3:\tbroken")) == "train.jsonl: row 3: broken"


def test_termination_message_goes_to_the_env_path_truncated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(target))
    write_termination_message("bad input: row 1")
    assert target.read_text() == "bad input: row 1"
    # 4096 bytes at most, and a multi-byte character is never cut in half.
    write_termination_message("é" * 3000)
    written = target.read_bytes()
    assert len(written) == 4096
    assert written.decode("utf-8") == "é" * 2048


def test_termination_message_outside_a_pod_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_TERMINATION_LOG", raising=False)
    if Path("/dev/termination-log").exists():
        pytest.skip("running inside a pod")
    assert termination_log_path() is None
    write_termination_message("nothing to write to")  # must not raise or create files
    assert not Path("/dev/termination-log").exists()
