"""Publishing to S3 (a real moto server over HTTP): every file in the manifest is there with
its sha256, and a run that fails leaves no manifest."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer import pipeline
from kubetune_trainer.modeling import Hardware
from kubetune_trainer.pipeline import EvaluationGateError, RunOptions, run_pipeline
from kubetune_trainer.publish import MANIFEST
from tests.fixtures.s3 import check_published

CPU = Hardware("cpu", bf16_supported=False)


class Recorder:
    def __init__(self) -> None:
        self.events = []

    def emit(self, event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        item["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listing
    }


@pytest.mark.slow
def test_run_publishes_artifacts_and_manifest_to_s3(
    s3_env, s3_server, tiny_job, demo_dataset_path, tmp_path
):
    manifest = tiny_job(
        f"s3://{s3_env}/runs/",
        method="lora",
        training={"maxSteps": 6, "checkpointEverySteps": 3},
        evaluation={"enabled": True, "maxSamples": 3, "maxNewTokens": 8, "sampleOutputs": 1},
    )
    manifest["metadata"]["namespace"] = "team-a"
    job = FineTuneJob.model_validate(manifest)
    recorder = Recorder()

    result = run_pipeline(
        job, recorder, RunOptions(work_dir=tmp_path / "work", namespace="team-a", hardware=CPU)
    )

    prefix = "runs/team-a/tiny/"
    objects = _objects(s3_server.client(), s3_env, prefix)
    published = json.loads(objects[MANIFEST])
    files = published["files"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files.keys()
    assert {"adapter/tokenizer.json", "metrics.json", "loss_curve.png"} <= files.keys()
    # Every file the manifest names is in the bucket with that exact content...
    assert check_published(s3_server.client(), s3_env, prefix).problems == []
    # ...and everything else there is the manifest itself or resumable checkpoints.
    others = set(objects) - set(files) - {MANIFEST}
    assert others and all(key.startswith("checkpoints/checkpoint-") for key in others)
    assert objects["loss_curve.png"].startswith(b"\x89PNG")

    expected_digest = "sha256:" + hashlib.sha256(demo_dataset_path.read_bytes()).hexdigest()
    assert published["dataset"]["digest"] == expected_digest
    assert published["dataset"]["trainRows"] == 56 and published["dataset"]["validationRows"] == 8
    assert published["baseModel"]["uri"] == job.spec.model.uri
    assert published["config"]["training"]["lrScheduler"] == "constant"
    assert published["config"]["lora"]["r"] == 16  # defaults filled in
    assert published["libraries"]["torch"] and published["libraries"]["trl"]
    assert published["tokensTrained"] > 0 and published["totalSteps"] == 6
    assert "evalPassed" in published
    # maxSeqLength (128) cut nothing: said so, in the manifest, the metrics and the result.
    assert published["dataset"]["truncatedRows"] == 0
    assert published["dataset"]["excludedRows"] == 0
    assert published["dataset"]["promptTemplate"] == "chat"  # the tiny model has a template
    assert result.metrics.truncatedRows == 0 and result.metrics.excludedRows == 0
    assert result.metrics.packing is True and published["notes"] == []
    # The adapter names the base model by its URI, not the pod-local path it was loaded from.
    adapter_config = json.loads(objects["adapter/adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == job.spec.model.uri
    # The evaluation stage's files are published next to the artifacts.
    assert any(name.startswith("report") for name in files)

    metrics = json.loads(objects["metrics.json"])
    assert [e["step"] for e in metrics["logHistory"] if "loss" in e] == [1, 2, 3, 4, 5, 6]

    assert result.artifacts.model == f"s3://{s3_env}/{prefix}adapter/"
    assert result.artifacts.manifest == f"s3://{s3_env}/{prefix}{MANIFEST}"
    assert result.metrics.tokensTrained == published["tokensTrained"]
    assert result.totalSteps == 6
    assert len(result.model_dump_json(exclude_none=True).encode()) < 4096

    stages = [e.stage for e in recorder.events if e.event == "stage"]
    assert stages == ["model-download", "dataset", "model-build", "train", "evaluate", "publish"]
    steps = [e for e in recorder.events if e.event == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.totalSteps == 6 and e.tokensPerSecond > 0 for e in steps)
    checkpoints = [e.step for e in recorder.events if e.event == "checkpoint"]
    assert checkpoints == [3, 6]


@pytest.mark.slow
def test_failed_run_leaves_no_manifest(s3_env, s3_server, tiny_job, tmp_path, monkeypatch):
    client = s3_server.client()
    stale_key = "runs/default/tiny/manifest.json"
    client.put_object(Bucket=s3_env, Key=stale_key, Body=b'{"stale": true}')
    job = FineTuneJob.model_validate(
        tiny_job(f"s3://{s3_env}/runs/", training={"maxSteps": 2}, evaluation={"enabled": True})
    )

    def crash(inputs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(pipeline, "evaluate_after_training", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_pipeline(
            job, Recorder(), RunOptions(work_dir=tmp_path, namespace="default", hardware=CPU)
        )

    keys = _objects(client, s3_env, "runs/default/tiny/").keys()
    assert MANIFEST not in keys  # the stale one is gone and no new one was written
    assert not any(key.startswith("adapter/") for key in keys)


@pytest.mark.slow
def test_missed_threshold_publishes_merged_model_then_fails(tiny_job, tmp_path):
    out = tmp_path / "out"
    manifest = tiny_job(
        out.as_uri(),
        training={"maxSteps": 2},
        evaluation={
            "enabled": True,
            "maxSamples": 2,
            "maxNewTokens": 4,
            "thresholds": {"maxEvalLoss": 0.001},
            "failOnThresholds": True,
        },
    )
    manifest["spec"]["output"]["mergeAdapter"] = True
    job = FineTuneJob.model_validate(manifest)
    with pytest.raises(EvaluationGateError, match=r"^evaluation thresholds missed: .*maxEvalLoss"):
        run_pipeline(
            job, Recorder(), RunOptions(work_dir=tmp_path / "w", namespace="local", hardware=CPU)
        )
    published = json.loads((out / "local" / "tiny" / MANIFEST).read_text())
    assert published["evalPassed"] is False
    assert any("maxEvalLoss" in miss for miss in published["evalMissed"])
    run = out / "local" / "tiny"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # The merged model is a plain model: it loads without peft and has no LoRA weights.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged-model")
    assert not any("lora" in name for name in merged.state_dict())
    assert published["artifacts"]["mergedModel"] == "merged-model/"
    assert "merged-model/model.safetensors" in published["files"]
