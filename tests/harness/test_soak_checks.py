"""The soak's checks can fail: a published file that differs from its manifest, a job that
did not Succeed, a FineTuneJob with two Jobs and an operator whose memory keeps growing are
each reported. No cluster needed (S3 is moto's server)."""

from __future__ import annotations

import hashlib
import json

from tests.fixtures.s3 import S3Server, check_published
from tests.fixtures.soak import MiB, Sample, SoakPlan, SoakReport


def publish(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    entries = {
        name: {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        for name, body in files.items()
    }
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=body)
    s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps({"files": entries}))


def test_check_published_names_each_file_that_differs_from_the_manifest(
    s3_env: str, s3_server: S3Server
) -> None:
    s3, prefix = s3_server.client(), "runs/ns/job/"
    files = {"adapter/a.bin": b"weights", "metrics.json": b"{}", "loss_curve.png": b"png"}
    publish(s3, s3_env, prefix, files)
    assert check_published(s3, s3_env, prefix).problems == []

    s3.put_object(Bucket=s3_env, Key=prefix + "adapter/a.bin", Body=b"weightz")  # same size
    s3.put_object(Bucket=s3_env, Key=prefix + "metrics.json", Body=b"{}\n")
    s3.delete_object(Bucket=s3_env, Key=prefix + "loss_curve.png")
    assert check_published(s3, s3_env, prefix).problems == [
        "adapter/a.bin: sha256 differs from the manifest",
        "metrics.json: 3 bytes, manifest says 2",
        "metrics.json: sha256 differs from the manifest",
        "loss_curve.png: missing",
    ]


def report(**fields) -> SoakReport:
    plan = SoakPlan(jobs=4, concurrency=2, rss_bound_mib=8)
    samples = [
        Sample(t=1, running=2, pods_running=2, finished=0, rss=100 * MiB),
        Sample(t=2, running=2, pods_running=2, finished=2, rss=110 * MiB),  # warm
        Sample(t=3, running=0, pods_running=0, finished=4, rss=112 * MiB),
    ]
    base = {
        "plan": plan,
        "cpu_per_job": "4000m",
        "phases": {"Succeeded": 4},
        "samples": samples,
        "rss_start": 90 * MiB,
        "rss_end": 112 * MiB,
    }
    return SoakReport(**{**base, **fields})


def test_a_good_soak_passes_and_its_figures_come_from_the_samples() -> None:
    good = report()
    assert good.failures() == []
    assert good.peak_running == 2
    assert good.rss_warm == 110 * MiB and good.rss_peak == 112 * MiB
    assert good.rss_growth_mib == 2
    assert json.loads(good.to_json())["failures"] == []


def test_each_broken_promise_is_a_failure() -> None:
    assert "Succeeded" in report(phases={"Succeeded": 3, "Failed": 1}).failures()[0]
    assert "one Job" in report(jobs_per_ftj={"soak-001": 2}).failures()[0]
    problems = {"soak-002": ["metrics.json: missing"]}
    assert "manifests" in report(artifact_problems=problems).failures()[0]
    (leak,) = report(rss_end=130 * MiB).failures()
    assert leak == "operator RSS grew 20.0 MiB after warm-up (bound 8 MiB)"
