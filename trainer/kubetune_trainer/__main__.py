"""`python -m kubetune_trainer` / `kubetune-trainer`: the program in the trainer pod.

stdout carries JSON-line progress events only (the last line is `completed` or `failed`);
library chatter goes to stderr. Exit codes: 0 done (termination message: TrainerResult JSON),
3 bad input (nothing trained; the message names the file, row or field), 4 evaluation gate
missed, 5 stopped by SIGTERM with a checkpoint of the current step saved, 1 anything else.
A job with spec.dryRun runs the data stage only and writes its preview (kubetune_trainer.preview).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from kubetune.api.contract import (
    DEFAULT_JOB_CONFIG,
    DEFAULT_WORK_DIR,
    ENV_JOB_CONFIG,
    ENV_WORK_DIR,
    EXIT_BAD_INPUT,
    EXIT_EVAL_THRESHOLDS,
    EXIT_FAILURE,
    EXIT_PREEMPTED,
)
from kubetune_trainer.errors import BadInputError, one_line, write_termination_message


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubetune-trainer", description="Run one FineTuneJob (the trainer pod's program)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"FineTuneJob manifest (default: ${ENV_JOB_CONFIG} or {DEFAULT_JOB_CONFIG})",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"scratch space (default: ${ENV_WORK_DIR} or {DEFAULT_WORK_DIR})",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        help="artifact namespace (default: the manifest's metadata.namespace, else 'default')",
    )
    return parser.parse_args(argv)


def failure_summary(error: BaseException) -> str:
    """One line for the termination message: the exception's type and first message line."""
    text = one_line(str(error)) or "(no message)"
    return f"{type(error).__name__}: {text}"


# The termination message of a trainer stopped by SIGTERM.
STOPPED_MESSAGE = (
    "TrainerStopped: stopped by SIGTERM (the pod is being deleted: suspended, evicted, "
    "preempted or its node lost); the next attempt resumes from the last complete checkpoint"
)


def _stop() -> None:
    """SIGTERM outside training: exit at once, as SIGKILL would, but with a message. Not an
    exception: one raised here surfaces wherever the main thread happens to be, and a handler
    there (a progress reporter's, say) would swallow it. Checkpoints need no cleanup: an upload
    cut short has no completeness marker."""
    with contextlib.suppress(OSError):
        write_termination_message(STOPPED_MESSAGE)
    print(STOPPED_MESSAGE, file=sys.stderr, flush=True)
    os._exit(EXIT_FAILURE)


def _die_by_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    from kubetune_trainer import distributed

    if distributed.is_gang_pod():
        # The pod of a gang: start torchrun, whose workers run this program again.
        return distributed.main(argv)
    args = parse_args(argv)  # before the imports below: `--help` stays instant
    from kubetune_trainer import preemption

    # During training SIGTERM stops after the current optimizer step with a checkpoint of it
    # (kubetune_trainer.preemption); otherwise at once. As the container's PID 1 the trainer
    # must handle it itself (init has no default action: the kubelet would wait out the grace
    # period, then SIGKILL it without a word); a torchrun worker outside training dies as
    # SIGTERM's default action would have it.
    under_torchrun = distributed.ENV_LOCAL_RANK in os.environ
    preemption.install(_die_by_sigterm if under_torchrun else _stop)
    config = args.config or Path(os.environ.get(ENV_JOB_CONFIG) or DEFAULT_JOB_CONFIG)
    work_dir = args.work_dir or Path(os.environ.get(ENV_WORK_DIR) or DEFAULT_WORK_DIR)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )

    # Imported here so that `--help` is instant and import failures are reported like the rest.
    from kubetune_trainer.distributed import current
    from kubetune_trainer.progress import (
        HttpReporter,
        JsonLinesReporter,
        MultiReporter,
        make_event,
        quiet_libraries,
    )

    rank = current()
    events_out = sys.stdout
    reporters = []
    # In a gang rank 0 alone reports, and alone writes the termination message on success.
    if rank.is_main:
        reporters.append(JsonLinesReporter(events_out))
        http = HttpReporter.from_env()
        if http is not None:
            reporters.append(http)
    reporter = MultiReporter(reporters)
    quiet_libraries()
    try:
        # Anything a library prints goes to stderr: stdout is the event stream.
        with contextlib.redirect_stdout(sys.stderr):
            from kubetune_trainer.config import load_job
            from kubetune_trainer.pipeline import RunOptions, run_pipeline

            job = load_job(config)
            namespace = args.namespace or job.namespace
            if job.spec.dryRun:  # the data stage and its preview only: nothing is trained
                from kubetune_trainer.preview import dry_run

                result = dry_run(job, reporter, work_dir, namespace)
            else:
                options = RunOptions(work_dir=work_dir, namespace=namespace)
                result = run_pipeline(job, reporter, options)
            if result is None:  # a rank other than 0: rank 0 published and reported
                return 0
    except preemption.Preempted as error:
        # Every rank exits with the code: the gang's launcher and the operator read it.
        message = f"Preempted: {error}"
        print(message, file=sys.stderr)
        if rank.is_main:
            write_termination_message(message)
        reporter.emit(make_event("stage", stage="preempted", step=error.step, message=message))
        reporter.close()
        return EXIT_PREEMPTED
    except BadInputError as error:
        message = str(error)
        print(message, file=sys.stderr)
        write_termination_message(message)
        reporter.emit(make_event("failed", message=message))
        reporter.close()
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - every failure must end in a termination message
        from kubetune_trainer.pipeline import EvaluationGateError, GangFailedError

        gate_missed = isinstance(error, EvaluationGateError)
        if gate_missed:
            message = str(error)  # artifacts are published; the misses are the whole story
        else:
            traceback.print_exc(file=sys.stderr)
            message = failure_summary(error)
        # A rank echoing rank 0's outcome leaves rank 0's message in place.
        if rank.is_main or not isinstance(error, EvaluationGateError | GangFailedError):
            write_termination_message(message)
        reporter.emit(make_event("failed", message=message))
        reporter.close()
        return EXIT_EVAL_THRESHOLDS if gate_missed else EXIT_FAILURE
    write_termination_message(result.model_dump_json(exclude_none=True))
    reporter.emit(
        make_event(
            "completed",
            step=result.totalSteps,
            totalSteps=result.totalSteps,
            loss=result.metrics.trainLoss,
            evalLoss=result.metrics.evalLoss,
            resumedFromStep=result.resumedFromStep,
            message=result.artifacts.manifest or result.message,
        )
    )
    reporter.close()
    return 0


def main_recording_exit() -> int:
    """`main`, leaving its exit code where a gang launcher reads it: torchrun itself exits 1
    for any failed worker, and the pod's exit code must still say "bad input, do not retry"."""
    from kubetune_trainer.distributed import record_exit_code, record_start

    record_start()
    code = main()
    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main_recording_exit())
