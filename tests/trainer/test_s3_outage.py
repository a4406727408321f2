"""S3 going away: uploads ride out an outage with backoff and training goes on; past the
bound the run fails naming S3, with the checkpoints already uploaded intact; and the
manifest is only ever written once everything it lists is there."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer import storage
from kubetune_trainer.modeling import Hardware
from kubetune_trainer.pipeline import RunOptions, run_pipeline
from kubetune_trainer.progress import JsonLinesReporter
from tests.fixtures.outage import outage_proxy
from tests.fixtures.s3 import S3Server, check_published

CPU = Hardware("cpu", bf16_supported=False)


@pytest.fixture
def proxied_s3(s3_env: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch):
    with outage_proxy(s3_server.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield s3_env, proxy


def test_a_write_rides_out_a_short_outage(proxied_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, proxy = proxied_s3
    monkeypatch.setenv(storage.ENV_S3_OUTAGE_SECONDS, "60")
    store = storage.open_store(f"s3://{bucket}/runs/")
    proxy.down()
    threading.Timer(3.0, proxy.up).start()  # back in 3 s
    started = time.monotonic()
    store.write_text("a.txt", "hello")
    assert time.monotonic() - started >= 2.5  # it did wait for the endpoint
    assert store.read_text("a.txt") == "hello"


def test_past_the_bound_it_fails_naming_s3(proxied_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, proxy = proxied_s3
    monkeypatch.setenv(storage.ENV_S3_OUTAGE_SECONDS, "3")
    store = storage.open_store(f"s3://{bucket}/runs/")
    proxy.down()
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError) as error:
        store.write_text("a.txt", "hello")
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert message.startswith(f"S3 unavailable: s3://{bucket} did not answer for 3 s")
    assert "\n" not in message


# The figure: S3 gone for a minute, as when an endpoint or its load balancer restarts.
OUTAGE_SECONDS = 60.0


class OutageAt(JsonLinesReporter):
    """Takes S3 down for `seconds` when the trainer announces `moment`: its first checkpoint
    ("checkpoint", whose upload then meets the outage) or the publish stage ("publish")."""

    def __init__(self, proxy: Any, moment: str, seconds: float) -> None:
        super().__init__(io.StringIO())
        self.proxy, self.moment, self.seconds = proxy, moment, seconds
        self.down_at: float | None = None

    def emit(self, event: Any) -> None:
        super().emit(event)
        moment = event.stage if event.event == "stage" else event.event
        if self.down_at is None and moment == self.moment:
            self.down_at = time.monotonic()
            self.proxy.down()
            threading.Timer(self.seconds, self.proxy.up).start()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["checkpoint", "publish"])
def test_training_goes_on_through_an_outage_and_publishes_a_complete_run(
    moment: str,
    proxied_s3,
    s3_server: S3Server,
    tiny_job: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, proxy = proxied_s3
    monkeypatch.setenv(storage.ENV_S3_OUTAGE_SECONDS, "300")
    manifest = tiny_job(f"s3://{bucket}/runs/", training={"maxSteps": 8, "checkpointEverySteps": 2})
    job = FineTuneJob.model_validate(manifest)
    reporter = OutageAt(proxy, moment, seconds=OUTAGE_SECONDS)
    options = RunOptions(work_dir=tmp_path / "work", namespace="default", hardware=CPU)
    result = run_pipeline(job, reporter, options)

    assert reporter.down_at is not None and result.totalSteps == 8
    # The run rode the whole outage out rather than finishing around it.
    assert time.monotonic() - reporter.down_at >= OUTAGE_SECONDS
    s3 = s3_server.client()
    prefix = "runs/default/tiny/"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    objects = {o["Key"][len(prefix) :]: o for o in listed}
    # manifest.json is there, and every file it lists is there with its sha256 and size.
    assert check_published(s3, bucket, prefix).problems == []
    checkpoints = {k.split("/")[1] for k in objects if k.startswith("checkpoints/")}
    assert checkpoints, sorted(objects)
