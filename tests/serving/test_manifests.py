"""Serving manifests (kubetune/serving.py) and `kubetune serve`.

The pure tests pin the shapes; the cluster test has a real API server validate every manifest
against KServe's own CRDs (hack/kserve.sh) with `kubectl apply --dry-run=server`, for a
LoRA, a QLoRA and a full fine-tune and for a merged model, as `kubetune serve` prints them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import serving
from kubetune_devcluster.processes import wait_for
from tests.serving.parts import cached_part

ROOT = Path(__file__).resolve().parents[2]

SUCCEEDED: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-lora", "namespace": "team-a"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
        "method": "lora",
        "lora": {"r": 24},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"},
        "resources": {"gpus": 1},
    },
    "status": {
        "phase": "Succeeded",
        "metrics": {"evalPassed": True},
        "artifacts": {
            "model": "s3://out/team-a/support-lora/adapter/",
            "mergedModel": "s3://out/team-a/support-lora/merged-model/",
        },
    },
}


def job(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(SUCCEEDED)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = obj
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return obj


def test_vllm_max_lora_rank_is_the_smallest_allowed_value_holding_the_rank() -> None:
    assert [serving.vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 24, 300, 512)] == [
        1, 8, 8, 16, 16, 32, 320, 512,
    ]  # fmt: skip
    with pytest.raises(serving.ServingError, match="above vLLM's largest"):
        serving.vllm_max_lora_rank(513)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (job(status__phase="Running"), "support-lora is Running: only a Succeeded"),
        (job(status__metrics={"evalPassed": False}), "missed its evaluation thresholds"),
        (job(status__artifacts={}), "no published model"),
    ],
)
def test_a_job_that_is_not_ready_is_refused_with_the_reason(obj: dict, message: str) -> None:
    with pytest.raises(serving.ServingError, match=message):
        serving.served_model(obj)


def test_force_serves_a_job_whose_gate_failed_and_merged_needs_a_merged_model() -> None:
    failed = job(status__metrics={"evalPassed": False})
    assert serving.served_model(failed, force=True).adapter_uri.endswith("/adapter/")
    with pytest.raises(serving.ServingError, match="mergeAdapter"):
        serving.served_model(job(status__artifacts={"model": "s3://o/a/"}), merged=True)


def test_inference_service_mounts_base_and_adapter_and_registers_the_lora() -> None:
    isvc = serving.build_inference_service(serving.served_model(SUCCEEDED))
    predictor = isvc["spec"]["predictor"]
    assert predictor["storageUris"] == [
        {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct", "mountPath": "/mnt/models"},
        {"uri": "s3://out/team-a/support-lora/adapter", "mountPath": "/mnt/adapter"},
    ]
    assert predictor["model"]["args"] == [
        "--model_name=support-lora",
        "--enable-lora",
        "--max-lora-rank=32",
        "--lora-modules=support-lora=/mnt/adapter",
    ]


def test_full_and_merged_models_are_served_alone() -> None:
    full = job(spec__method="full", status__artifacts={"model": "s3://out/j/model/"})
    for model in (serving.served_model(full), serving.served_model(SUCCEEDED, merged=True)):
        isvc = serving.build_inference_service(model)
        assert len(isvc["spec"]["predictor"]["storageUris"]) == 1
        assert "--enable-lora" not in isvc["spec"]["predictor"]["model"]["args"]
        llm = serving.build_llm_inference_service(model)
        assert "lora" not in llm["spec"]["model"]


def test_llm_inference_service_names_the_adapter() -> None:
    llm = serving.build_llm_inference_service(serving.served_model(SUCCEEDED))
    assert llm["spec"]["model"]["uri"] == "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert llm["spec"]["model"]["lora"] == {
        "adapters": [{"name": "support-lora", "uri": "s3://out/team-a/support-lora/adapter"}],
        "maxRank": 32,
    }


def test_vllm_command_registers_the_adapter_with_its_base() -> None:
    args = serving.build_vllm_args(serving.served_model(SUCCEEDED))
    assert args[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert args[args.index("--max-lora-rank") + 1] == "32"
    module = json.loads(args[args.index("--lora-modules") + 1])
    assert module == {
        "name": "support-lora",
        "path": "./adapter",
        "base_model_name": "hf://meta-llama/Llama-3.1-8B-Instruct",
    }
    snippet = serving.render_vllm(serving.served_model(SUCCEEDED))
    assert snippet.startswith(
        "aws s3 cp --recursive s3://out/team-a/support-lora/adapter/ ./adapter\n"
    )


def test_a_local_file_location_cannot_be_served_by_kserve() -> None:
    local = job(spec__model={"uri": "file:///models/base"})
    with pytest.raises(serving.ServingError, match="KServe cannot download file://"):
        serving.build_inference_service(serving.served_model(local))


def test_adapters_vllm_would_refuse_are_named_with_the_reason() -> None:
    plain = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"], "init_lora_weights": True}
    assert serving.vllm_adapter_limits(plain) == []
    assert serving.vllm_adapter_limits({**plain, "init_lora_weights": "gaussian"}) == []
    problems = serving.vllm_adapter_limits(
        {
            **plain,
            "modules_to_save": ["lm_head"],
            "use_dora": True,
            "init_lora_weights": "pissa",
            "rank_pattern": {"q_proj": 1024},
        }
    )
    assert [p.split(" ")[0] for p in problems] == ["modules_to_save", "DoRA", "init_lora_weights",
                                                  "rank"]  # fmt: skip
    assert "rank 1024 above vLLM's largest --max-lora-rank 512" in problems[-1]


def test_an_adapter_the_trainer_marked_unservable_is_served_merged_or_forced() -> None:
    note = "vLLM cannot load this adapter: DoRA (use_dora; vLLM does not implement it)"
    marked = job(status__artifacts={**SUCCEEDED["status"]["artifacts"], "servingNote": note})
    with pytest.raises(serving.ServingError, match=r"DoRA .* \(serve it with --merged, or"):
        serving.served_model(marked)
    assert serving.served_model(marked, merged=True).model_uri.endswith("/merged-model/")
    assert serving.served_model(marked, force=True).is_adapter


def test_pissa_and_olora_adapters_are_served_at_twice_their_rank() -> None:
    # peft publishes them as their difference from the initial adapter: rank 2r.
    pissa = job(spec__lora={"r": 24, "init": "pissa"})
    args = serving.build_vllm_args(serving.served_model(pissa))
    assert args[args.index("--max-lora-rank") + 1] == "64"


# --- against KServe's CRDs on a real API server -----------------------------------------


def kserve_crd_dir() -> Path:
    return cached_part("kserve.sh", "KServe's CRDs")


def pruned(written: Any, stored: Any, path: str = "spec") -> list[str]:
    """Paths of `written` that the server did not keep in `stored`."""
    if isinstance(written, dict):
        if not isinstance(stored, dict):
            return [path]
        return [
            p
            for key, value in written.items()
            for p in (
                pruned(value, stored[key], f"{path}.{key}") if key in stored else [f"{path}.{key}"]
            )
        ]
    if isinstance(written, list):
        if not isinstance(stored, list) or len(stored) != len(written):
            return [path]
        return [
            p
            for i, (w, s) in enumerate(zip(written, stored, strict=True))
            for p in pruned(w, s, f"{path}[{i}]")
        ]
    return [] if written == stored else [path]


def kubetune_serve(cluster: Any, namespace: str, *args: str) -> tuple[int, str, str]:
    from kubetune_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["serve", "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, *args])
    return code, out.getvalue(), err.getvalue()


def put_job(cluster: Any, namespace: str, obj: dict[str, Any]) -> None:
    """Create the FineTuneJob and write its status as the operator would have."""
    meta = {**obj["metadata"], "namespace": namespace}
    spec_only = {k: v for k, v in obj.items() if k != "status"} | {"metadata": meta}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(spec_only))
    cluster.kubectl(
        "patch", "finetunejob", meta["name"], "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": obj["status"]}),
    )  # fmt: skip


def test_kubetune_serve_prints_manifests_the_api_server_accepts(
    k8s_cluster: Any, k8s_namespace: str
) -> None:
    from tests.fixtures.operator import install_crd

    crds = kserve_crd_dir()
    install_crd(k8s_cluster)
    for crd in sorted(crds.glob("*.yaml")):
        k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    rest = k8s_cluster.rest()

    def established(name: str) -> bool:
        crd = rest.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    for crd in ("inferenceservices.serving.kserve.io", "llminferenceservices.serving.kserve.io"):
        wait_for(lambda name=crd: established(name), timeout=60, what=crd)
    qlora = job(metadata__name="support-qlora", spec__method="qlora")
    full = job(
        metadata__name="support-full",
        spec__method="full",
        status__artifacts={"model": "s3://out/team-a/support-full/model/"},
    )
    del full["spec"]["lora"]
    for obj in (SUCCEEDED, qlora, full):
        put_job(k8s_cluster, k8s_namespace, obj)

    cases = [(name, []) for name in ("support-lora", "support-qlora", "support-full")]
    cases += [("support-lora", ["--merged"]), ("support-qlora", ["--merged"])]
    for name, extra in cases:
        for target in ("inferenceservice", "llminferenceservice"):
            code, manifest, err = kubetune_serve(
                k8s_cluster, k8s_namespace, name, "--target", target, *extra
            )
            assert code == 0, err
            doc = yaml.safe_load(manifest)
            assert doc["metadata"]["namespace"] == k8s_namespace
            accepted = k8s_cluster.kubectl(
                "apply", "--dry-run=server", "-o", "json", "-f", "-", input=manifest, check=False
            )
            assert accepted.returncode == 0, f"{name} {target} {extra}: {accepted.stderr}"
            # The server kept every field we wrote (nothing pruned as unknown).
            missing = pruned(doc["spec"], json.loads(accepted.stdout)["spec"])
            assert not missing, f"{name} {target}: fields dropped by the server: {missing}"

    # A job whose gate failed is refused unless --force; an invalid field is refused by KServe.
    failed = job(metadata__name="gate-failed", status__metrics={"evalPassed": False})
    put_job(k8s_cluster, k8s_namespace, failed)
    code, _, err = kubetune_serve(k8s_cluster, k8s_namespace, "gate-failed")
    assert code == 1 and "missed its evaluation thresholds" in err
    code, manifest, _ = kubetune_serve(k8s_cluster, k8s_namespace, "gate-failed", "--force")
    assert code == 0
    broken = yaml.safe_load(manifest)
    broken["spec"]["predictor"]["storageUris"][0]["mountPath"] = "relative/path"
    refused = k8s_cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(broken), check=False
    )
    assert refused.returncode != 0 and "mountPath" in refused.stderr
