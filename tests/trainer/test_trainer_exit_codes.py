"""The trainer's exit codes, which the operator's podFailurePolicy acts on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from kubetune.api.contract import EXIT_EVAL_THRESHOLDS, EXIT_PREEMPTED, NON_RETRYABLE_EXIT_CODES
from tests.fixtures.tiny_model import trainer_pod_files


@pytest.mark.slow
def test_missed_gate_exits_with_its_own_non_retryable_code(tiny_job, tmp_path):
    out = tmp_path / "out"
    manifest = tiny_job(
        out.as_uri(),
        training={"maxSteps": 2},
        evaluation={
            "maxSamples": 2,
            "maxNewTokens": 4,
            "thresholds": {"maxEvalLoss": 0.001},
            "failOnThresholds": True,
        },
    )
    termination_log, env = trainer_pod_files(manifest, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_EVAL_THRESHOLDS, proc.stderr[-2000:]
    assert EXIT_EVAL_THRESHOLDS in NON_RETRYABLE_EXIT_CODES
    message = termination_log.read_text()
    assert message.startswith("evaluation thresholds missed") and "maxEvalLoss" in message
    assert "\n" not in message.strip()
    # Artifacts are published even so, and the manifest records the miss.
    (manifest_path,) = out.glob("*/tiny/manifest.json")
    published = json.loads(manifest_path.read_text())
    assert published["evalPassed"] is False


@pytest.mark.slow
def test_sigterm_stops_the_trainer_after_its_step_with_a_message(tiny_job, tmp_path):
    """The kubelet stops a pod with SIGTERM; as PID 1 without a handler the trainer would
    ignore it until the SIGKILL at the end of the grace period. Mid-training it finishes the
    step, saves it and exits with the Preempted code (tests/trainer/test_preemption.py has the
    checkpoint and the resume)."""
    manifest = tiny_job((tmp_path / "out").as_uri(), training={"maxSteps": 500})
    termination_log, env = trainer_pod_files(manifest, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:  # JSON lines; training has begun at the first step
            if (json.loads(line).get("step") or 0) >= 1:
                break
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == EXIT_PREEMPTED, code  # not a failure: the Job's podFailurePolicy ignores it
    message = termination_log.read_text()
    assert message.startswith("Preempted: stopped by SIGTERM after step "), message
