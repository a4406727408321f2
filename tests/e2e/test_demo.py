"""`kubetune demo` end to end on the real local control plane: S3 server, operator, trainer pod,
live progress, artifacts in S3, the evaluation summary, and nothing left running afterwards.

    .venv/bin/pytest -q -m cluster tests/e2e/test_demo.py
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from kubetune_devcluster import demo
from kubetune_devcluster.processes import is_alive, listening_ports
from kubetune_devcluster.stack import FTJ_API
from tests.fixtures.cluster import cluster_or_skip

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_local_and_cluster_quickstarts_train_the_same_job() -> None:
    local = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())["spec"]
    cluster = yaml.safe_load((EXAMPLES / "quickstart-cluster.yaml").read_text())["spec"]
    for key in ("method", "lora", "training", "evaluation"):
        assert local[key] == cluster[key], key
    assert local["dataset"]["format"] == cluster["dataset"]["format"]


def test_plan_reads_the_s3_layout_from_the_manifest() -> None:
    manifest = yaml.safe_load((EXAMPLES / "quickstart-cluster.yaml").read_text())
    plan = demo.plan_from_manifest(manifest, "team-a")
    assert plan.model == demo.S3Location("kubetune-demo", "models/tiny/")
    assert plan.dataset == demo.S3Location("kubetune-demo", "data/train.jsonl")
    assert plan.output == demo.S3Location("kubetune-demo", "runs/team-a/quickstart/")
    assert plan.secret_name == "s3-credentials" and plan.buckets == ("kubetune-demo",)


def test_plan_rejects_a_manifest_the_demo_cannot_serve() -> None:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    with pytest.raises(demo.DemoError, match=r"spec.model.uri: the demo needs an s3:// URI"):
        demo.plan_from_manifest(manifest, "default")


def test_bad_manifest_fails_with_one_line_naming_file_and_field(tmp_path: Path) -> None:
    manifest = yaml.safe_load((EXAMPLES / "quickstart-cluster.yaml").read_text())
    manifest["spec"]["training"]["learningRate"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(demo.DemoError) as error:
        demo.run_demo(demo.DemoSettings(manifest=path), Console(file=io.StringIO()))
    assert str(error.value) == (
        f"{path}: spec.training.learningRate: Input should be greater than 0"
    )


def test_artifact_table_folds_checkpoints() -> None:
    keys = {
        "adapter/adapter_model.safetensors": 2048,
        "report.json": 10,
        "checkpoints/checkpoint-10/optimizer.pt": 100,
        "checkpoints/checkpoint-10/trainer_state.json": 20,
    }
    out = io.StringIO()
    Console(file=out, width=120).print(demo.artifact_table("s3://b/runs/ns/x/", keys))
    text = out.getvalue()
    assert "adapter/adapter_model.safetensors" in text and "2.0 KiB" in text
    assert "checkpoints/checkpoint-10/ (2 files)" in text and "optimizer.pt" not in text


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_the_quickstart_on_the_local_cluster_and_cleans_up() -> None:
    cluster_or_skip()
    out = io.StringIO()
    console = Console(file=out, width=120)
    seen: dict[str, Any] = {}

    def inspect(context: dict[str, Any]) -> None:
        """While everything still runs: S3 and the cluster as they are, not as printed."""
        plan = context["plan"]
        seen["keys"] = demo.list_keys(context["s3"], plan.output)
        cluster = context["cluster"]
        seen["processes"] = [*cluster.processes, context["operator"].record]
        seen["ports"] = [*cluster.ports.values(), context["operator"].port]
        seen["ftj"] = cluster.rest().get(f"{FTJ_API}/namespaces/default/finetunejobs/{plan.name}")

    result = demo.run_demo(demo.DemoSettings(timeout_s=240), console, before_teardown=inspect)

    printed = out.getvalue()
    assert result.phase == "Succeeded", printed[-3000:]
    status = seen["ftj"]["status"]
    assert status["phase"] == "Succeeded"
    assert status["artifacts"]["model"] == "s3://kubetune-demo/runs/default/quickstart/adapter/"
    # The artifacts are in S3, and the demo listed what is there.
    for key in ("adapter/adapter_model.safetensors", "manifest.json", "report.json"):
        assert key in seen["keys"], sorted(seen["keys"])
    assert result.artifact_keys == seen["keys"]
    assert "adapter/adapter_model.safetensors" in printed and "report.json" in printed
    # Live progress: the job was seen running before it finished.
    total = status["progress"]["totalSteps"]
    assert total > 10 and "Running" in printed and f"{total}/{total} (100%)" in printed
    # The evaluation summary from report.json, and the tuned model visibly learned.
    for label in ("Eval loss", "Token F1", "ROUGE-L", "Format compliance", "Thresholds:"):
        assert label in printed, label
    tuned, base = result.report["tuned"], result.report["base"]
    assert tuned["evalLoss"] < base["evalLoss"] * 0.7, (base, tuned)
    assert tuned["formatCompliance"] > base["formatCompliance"], (base, tuned)
    # Torn down: no process of the cluster or the operator, no listening port, no work dir.
    assert not [r.name for r in seen["processes"] if is_alive(r)]
    assert not set(seen["ports"]) & listening_ports()
    assert result.work_dir is not None and not result.work_dir.exists()
