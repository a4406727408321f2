"""dpo, orpo, kto and grpo the way users run them: one FineTuneJob each, submitted to the
helm-installed operator image, trained by the trainer image under the real node's kubelet and
containerd, publishing to S3 (the stack of tests/e2e/test_real_node.py). The four run at
once, so the node's start-up (torch, transformers and TRL imported in each pod) is paid once.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q tests/e2e/test_objectives_real_node.py
"""

from __future__ import annotations

import json
import time

import pytest

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import wait_for
from tests.fixtures.ftj import FTJ_API, Poller, create, s3_keys
from tests.fixtures.preference_data import preference_rows
from tests.fixtures.real_node import RUN_TIMEOUT, RealStack, manifest
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = {"dpo": 12, "orpo": 12, "kto": 12, "grpo": 8}  # grpo generates: slower steps
METRIC = {"dpo": "preferenceAccuracy", "orpo": "preferenceAccuracy"}
METRIC |= {"kto": "preferenceAccuracy", "grpo": "meanReward"}
PAIRS, PROMPTS = "data/pairs.jsonl", "data/prompts.jsonl"


class Watch(Poller):
    """(name, phase, status.progress.step) of every FineTuneJob in a namespace, sampled."""

    def __init__(self, cluster: DevCluster, ns: str) -> None:
        super().__init__(interval_s=0.25)
        self.samples: list[tuple[str, str | None, int | None]] = []
        self._rest = cluster.rest()
        self._path = f"{FTJ_API}/namespaces/{ns}/finetunejobs"

    def poll(self) -> None:
        for item in self._rest.get(self._path)["items"]:
            status = item.get("status") or {}
            step = (status.get("progress") or {}).get("step")
            self.samples.append((item["metadata"]["name"], status.get("phase"), step))

    def steps_while_running(self, name: str) -> set[int]:
        return {s for n, p, s in self.samples if n == name and p == "Running" and s is not None}


def upload_objective_data(s3_server: S3Server, bucket: str) -> None:
    rows = preference_rows(48)
    prompts = [{"prompt": row["prompt"]} for row in rows]
    s3 = s3_server.client()
    for key, lines in ((PAIRS, rows), (PROMPTS, prompts)):
        body = "".join(json.dumps(line) + "\n" for line in lines)
        s3.put_object(Bucket=bucket, Key=key, Body=body.encode())


def objective_manifest(objective: str, bucket: str) -> dict:
    body = manifest(objective, bucket, steps=STEPS[objective], objective=objective)
    spec = body["spec"]
    spec["dataset"] = {"uri": f"s3://{bucket}/{PROMPTS if objective == 'grpo' else PAIRS}"}
    spec["dataset"]["validationSplit"] = 0.125
    # Four trainer pods at once on a 2-CPU node: requests that let all four be scheduled
    # (the CPU request is no limit; each uses what the node has free).
    spec["resources"]["cpu"] = "250m"
    if objective == "grpo":
        spec["rewards"] = [{"type": "regex", "pattern": "[A-Z].*"}]
        spec["grpo"] = {"numGenerations": 2, "maxCompletionLength": 4}
    return body


def test_each_objective_runs_through_the_operator(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster, s3_server = real_stack.cluster, real_stack.s3
    upload_objective_data(s3_server, real_assets)
    started = time.monotonic()
    with Watch(cluster, real_ns) as watch:
        for objective in STEPS:
            create(cluster, real_ns, objective_manifest(objective, real_assets))

        def all_finished() -> dict[str, dict] | None:
            items = cluster.rest().get(f"{FTJ_API}/namespaces/{real_ns}/finetunejobs")["items"]
            done = {
                i["metadata"]["name"]: i["status"]
                for i in items
                if (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            }
            return done if len(done) == len(STEPS) else None

        finished = wait_for(all_finished, timeout=RUN_TIMEOUT, interval=1, what="four jobs done")
    print(f"\nfour objectives through the operator in {time.monotonic() - started:.0f} s")
    for objective, steps in STEPS.items():
        st = finished[objective]
        assert st["phase"] == "Succeeded", (objective, st)
        assert st["progress"]["step"] == steps, (objective, st["progress"])
        # Progress reached the status while the trainer ran, not only at the end.
        running = watch.steps_while_running(objective)
        assert any(0 < s < steps for s in running), (objective, sorted(running))
        metrics = st["metrics"]
        metric = METRIC[objective]
        assert metrics.get(metric) is not None, (objective, metrics)
        assert metrics.get(f"base{metric[0].upper()}{metric[1:]}") is not None, metrics
        assert metrics.get("tokensTrained", 0) > 0, (objective, metrics)
        for field in ("model", "manifest", "report"):
            uri = st["artifacts"][field]
            assert uri.startswith(f"s3://{real_assets}/runs/{real_ns}/{objective}/"), uri
            assert s3_keys(s3_server, uri), f"{objective} {field}: nothing at {uri}"
        # The report (report.md) beside its report.json, with the tuned and base metric.
        report_json = st["artifacts"]["report"].rsplit("/", 1)[0] + "/report.json"
        report = s3_json(s3_server, report_json)
        assert report["objective"] == objective, report.get("objective")
        assert report["tuned"][metric] == metrics[metric], (objective, report["tuned"])
        assert report["base"][metric] is not None, (objective, report["base"])


def s3_json(s3_server: S3Server, uri: str) -> dict:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return json.loads(body)
