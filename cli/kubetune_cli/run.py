"""`kubetune run job.yaml [--output DIR]`: the trainer pod's pipeline on this machine.

Same manifest, same stages, same artifacts as in the cluster, with a progress bar instead of
JSON lines. With file:// URIs (or --output DIR) no cloud account is needed at all.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    ENV_WORK_DIR,
    EXIT_BAD_INPUT,
    EXIT_EVAL_THRESHOLDS,
    EXIT_FAILURE,
)
from kubetune.formatting import human_size

LOCAL_NAMESPACE = "local"  # artifacts of local runs go to <output>/local/<name>/
DEFAULT_LOCAL_WORK_DIR = Path.home() / ".cache" / "kubetune" / "work"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a FineTuneJob on this machine",
        description="Fine-tune as the cluster would, on this machine, with a progress bar.",
    )
    parser.add_argument("manifest", type=Path, help="FineTuneJob manifest (YAML or JSON)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="artifact folder; overrides spec.output.uri with file://DIR",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"scratch space (default: ${ENV_WORK_DIR} or {DEFAULT_LOCAL_WORK_DIR}/<name>)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="trainer processes on this machine (one per GPU; gloo on CPU), launched with "
        "torchrun as in a multi-GPU pod; rank 0 reports, evaluates and publishes",
    )
    parser.set_defaults(func=run_command)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def print_summary(
    console: Any, location: str, manifest: dict[str, Any], report: dict[str, Any] | None
) -> None:
    """Where the artifacts went (a table of files) and the evaluation summary: the same
    base-vs-tuned table `kubetune report` prints, from the run's report.json."""
    from rich.markdown import Markdown
    from rich.table import Table

    from kubetune.report import render_gate_summary, render_report_table

    files = Table(title=f"Artifacts in {location}", title_justify="left")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, entry in manifest["files"].items():
        files.add_row(name, human_size(entry["size"]), entry["sha256"][:12])
    files.add_row("manifest.json", "", "")
    console.print(files)

    if report is not None:
        console.print("[bold]Evaluation[/]: base model vs tuned, on held-out examples")
        console.print(Markdown(render_report_table(report)))
        console.print(render_gate_summary(report))
    metrics = manifest.get("metrics", {})
    console.print(
        f"train loss {_fmt(metrics.get('trainLoss'))}, "
        f"{metrics.get('tokensTrained', 0):,} tokens trained in "
        f"{metrics.get('durationSeconds', 0):.1f} s"
    )


def read_report(store: Any, prefix: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The run's report.json (next to the report.md the manifest names), if evaluated."""
    from kubetune_cli.cluster import report_json_uri

    report = (manifest.get("artifacts") or {}).get("report")
    if not report:
        return None
    key = prefix + report_json_uri(report)
    return json.loads(store.read_text(key)) if store.exists(key) else None


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from kubetune_trainer.errors import BadInputError

    console = Console()
    errors = Console(stderr=True)

    def error_line(message: str) -> None:
        # Text, not markup: messages hold brackets such as `spec.tolerations[0]`.
        errors.print(Text.assemble(("error: ", "bold red"), message))

    try:
        from kubetune_trainer.config import load_job
        from kubetune_trainer.pipeline import EvaluationGateError, RunOptions, run_pipeline
        from kubetune_trainer.progress import RichReporter, quiet_libraries
        from kubetune_trainer.publish import MANIFEST, run_prefix
        from kubetune_trainer.storage import open_store

        quiet_libraries()
        job = load_job(args.manifest)
        if args.output is not None:
            job.spec.output.uri = args.output.resolve().as_uri() + "/"
        work_dir = args.work_dir or Path(
            os.environ.get(ENV_WORK_DIR) or DEFAULT_LOCAL_WORK_DIR / job.metadata.name
        )
        reporter = RichReporter(errors)
        failure = None
        try:
            if job.spec.dryRun:  # what the cluster's dry run does: the preview, no training
                from kubetune_trainer.preview import dry_run

                result = dry_run(job, reporter, work_dir, LOCAL_NAMESPACE)
                console.print(f"dry run: nothing trained; preview at {result.message}")
                return 0
            if args.processes > 1:
                code, message = run_gang(job, args.processes, work_dir, reporter)
                if code == EXIT_BAD_INPUT:
                    raise BadInputError(message or "bad input")
                if code != 0:
                    error_line(message or f"the trainer processes failed (exit code {code})")
                    if code != EXIT_EVAL_THRESHOLDS:
                        return code
                    failure = message
            else:
                options = RunOptions(work_dir=work_dir, namespace=LOCAL_NAMESPACE)
                run_pipeline(job, reporter, options)
        except EvaluationGateError as error:
            failure = str(error)  # the artifacts were published: show them, then fail
        finally:
            reporter.close()
    except BadInputError as error:
        error_line(str(error))
        return EXIT_BAD_INPUT
    store = open_store(job.spec.output.uri)
    prefix = run_prefix(LOCAL_NAMESPACE, job.metadata.name)
    manifest = json.loads(store.read_text(prefix + MANIFEST))
    print_summary(console, store.uri_for(prefix), manifest, read_report(store, prefix, manifest))
    if failure:
        error_line(failure)
        return EXIT_FAILURE
    return 0


def run_gang(job: Any, processes: int, work_dir: Path, reporter: Any) -> tuple[int, str | None]:
    """`processes` trainer ranks under torchrun, through the launcher the trainer pods use.
    Rank 0's JSON-line events drive the progress bar; the ranks' logs go to
    <work-dir>/trainer.log. Returns torchrun's exit code and the `failed` event's message."""
    import subprocess

    import yaml

    from kubetune.api.contract import ProgressEvent
    from kubetune_trainer.distributed import gang_exit_code, launch, local_gang_env, torchrun_argv

    work_dir.mkdir(parents=True, exist_ok=True)
    # The job as written: torchrun's environment alone says how many processes run here (as
    # the operator's does on a pod), and the trainer takes the gang's shape from torchrun,
    # never from spec.resources.
    config = work_dir / "job.yaml"
    config.write_text(yaml.safe_dump(job.wire()))
    program = ["-m", "kubetune_trainer", "--config", str(config), "--work-dir", str(work_dir)]
    program += ["--namespace", LOCAL_NAMESPACE]
    command, env = torchrun_argv(program), local_gang_env(processes)
    failed_message = None
    with (work_dir / "trainer.log").open("w") as log_file:
        gang, codes = launch(command, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert gang.stdout is not None
        for line in gang.stdout:
            try:
                event = ProgressEvent.model_validate_json(line)
            except ValueError:
                continue  # not an event (stdout of a library that escaped the redirect)
            if event.event == "failed":
                failed_message = event.message
            reporter.emit(event)
        code = gang_exit_code(gang.wait(), codes)
    return code, failed_message
