"""`kubetune submit|list|watch|logs|report|cancel|serve`: FineTuneJobs for cluster users.

Talks to the cluster of the current kubeconfig context (like kubectl; KUBECONFIG works),
in the context's namespace unless -n/--namespace says otherwise. `report` downloads the
evaluation report with the user's own AWS setup (env vars or profile), never through the
cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import v1alpha1 as api
from kubetune.api.errors import describe_validation_error
from kubetune.api.uris import UriError, parse_uri

TERMINAL = set(api.TERMINAL_PHASES)


class CliError(Exception):
    """A one-line message for the user; the command exits 1."""


# --- pure helpers ---------------------------------------------------------------------


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """FineTuneJobs in a YAML/JSON file, validated; errors name the file and the field."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not docs:
        raise CliError(f"{path}: no FineTuneJob in the file")
    out = []
    for i, doc in enumerate(docs):
        where = f"{path}" + (f" (document {i + 1})" if len(docs) > 1 else "")
        try:
            api.FineTuneJob.model_validate(doc)
        except ValidationError as exc:
            raise CliError(describe_validation_error(exc, where)) from None
        out.append(doc)
    return out


def age(timestamp: str | None, now: datetime | None = None) -> str:
    if not timestamp:
        return "-"
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


LIST_COLUMNS = ("NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "LOSS", "GPU-H", "COST", "AGE")


def usage_cells(usage: dict[str, Any] | None) -> tuple[str, str]:
    """(GPU-hours, estimated cost) of status.usage, e.g. ("1.25", "4.50 USD")."""
    usage = usage or {}
    gpu_seconds, cost = usage.get("gpuSeconds"), usage.get("estimatedCost")
    hours = f"{gpu_seconds / 3600:.2f}" if isinstance(gpu_seconds, int | float) else "-"
    money = f"{cost:.2f} {usage.get('currency') or ''}".strip() if cost is not None else "-"
    return hours, money


def list_rows(items: list[dict[str, Any]], now: datetime | None = None) -> list[list[str]]:
    rows = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        st, spec = item.get("status") or {}, item.get("spec") or {}
        progress = st.get("progress") or {}
        loss = progress.get("loss")
        rows.append(
            [
                item["metadata"]["name"],
                st.get("phase") or "-",
                spec.get("method", "-"),
                spec.get("model", {}).get("uri", "-"),
                progress.get("summary") or "-",
                f"{loss:.4f}" if isinstance(loss, int | float) else "-",
                *usage_cells(st.get("usage")),
                age(item["metadata"].get("creationTimestamp"), now),
            ]
        )
    return rows


def report_json_uri(report_uri: str) -> str:
    """report.json sits next to report.md in the artifacts."""
    return (
        report_uri[: -len("report.md")] + "report.json"
        if report_uri.endswith("report.md")
        else report_uri
    )


def split_s3(uri: str) -> tuple[str, str]:
    try:
        parsed = parse_uri(uri, schemes=("s3",))
    except UriError:
        raise CliError(f"{uri}: only s3:// reports can be fetched") from None
    return parsed.bucket, parsed.key


# --- cluster access -------------------------------------------------------------------


def current_namespace(kubeconfig: str | None) -> str:
    from kubernetes.config import list_kube_config_contexts

    try:
        _, active = list_kube_config_contexts(config_file=kubeconfig)
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: in-cluster or nothing; the request will say
        return "default"


def run_with_kube(args: argparse.Namespace, body: Callable[[Any, str], Awaitable[int]]) -> int:
    from kubetune.kube import Kube, KubeError

    async def main() -> int:
        kube = await Kube.connect(args.kubeconfig, pool_size=4)
        try:
            return await body(kube, args.namespace or current_namespace(args.kubeconfig))
        finally:
            await kube.close()

    try:
        return asyncio.run(main())
    except (CliError, KubeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def get_ftj(kube: Any, ns: str, name: str) -> dict[str, Any]:
    from kubetune.kube import ftj_path

    obj = await kube.get(ftj_path(ns, name))
    if obj is None:
        raise CliError(f"finetunejob {ns}/{name} not found")
    return obj


# --- commands -------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        manifests = load_manifests(Path(args.file))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def body(kube: Any, ns: str) -> int:
        from kubetune.kube import ftj_path

        for manifest in manifests:
            target = manifest["metadata"].get("namespace") or ns
            manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": target}}
            response = await kube.request("POST", ftj_path(target), manifest, ok=(409,))
            name = manifest["metadata"]["name"]
            if response.status == 409:
                raise CliError(f"finetunejob {target}/{name} already exists")
            print(f"finetunejob.kubetune.io/{name} created in {target}")
        return 0

    return run_with_kube(args, body)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    async def body(kube: Any, ns: str) -> int:
        from kubetune.kube import ftj_path

        path = (
            f"/apis/{api.GROUP}/{api.VERSION}/{api.PLURAL}" if args.all_namespaces else ftj_path(ns)
        )
        items = (await kube.get(path) or {}).get("items", [])
        table = Table(box=None)
        for column in LIST_COLUMNS:
            table.add_column(column)
        for row in list_rows(items):
            table.add_row(*row)
        Console().print(table)
        return 0

    return run_with_kube(args, body)


def progress_columns(time_column: Any) -> tuple:
    """The columns of a FineTuneJob's live progress bar (`watch`, `kubetune demo`)."""
    from rich.progress import BarColumn, TextColumn

    return (
        TextColumn("[bold]{task.fields[phase]}"),
        BarColumn(),
        TextColumn("{task.fields[summary]}"),
        TextColumn("loss {task.fields[loss]}"),
        time_column,
    )


def progress_fields(status: dict) -> dict[str, Any]:
    """`Progress.update` arguments for a progress bar from `progress_columns`."""
    progress = status.get("progress") or {}
    loss = progress.get("loss")
    return {
        "total": progress.get("totalSteps"),
        "completed": progress.get("step") or 0,
        "phase": status.get("phase") or "Pending",
        "summary": progress.get("summary") or status.get("reason") or "",
        "loss": f"{loss:.4f}" if isinstance(loss, int | float) else "-",
    }


def progress_line(status: dict[str, Any]) -> str:
    """`Running  17/34 (50%)  loss 0.4123`: one line of a job's status."""
    progress = status.get("progress") or {}
    parts = [status.get("phase") or "Pending"]
    if progress.get("summary"):
        parts.append(str(progress["summary"]))
    elif status.get("reason"):
        parts.append(str(status["reason"]))
    loss = progress.get("loss")
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.4f}")
    return "  ".join(parts)


async def watch_job(
    kube: Any,
    ns: str,
    name: str,
    console: Any,
    *,
    timeout: float | None = None,
    interval: float = 2.0,
) -> dict[str, Any]:
    """A live progress bar until the job ends; its final status. `watch` and the demo."""
    import time

    from rich.progress import Progress, TimeElapsedColumn

    deadline = time.monotonic() + timeout if timeout else None
    last_line = ""
    with Progress(*progress_columns(TimeElapsedColumn()), console=console) as bar:
        task = bar.add_task(name, total=None, phase="...", summary="", loss="-")
        while True:
            st = (await get_ftj(kube, ns, name)).get("status") or {}
            bar.update(task, **progress_fields(st))
            # Phase and reason changes as lines too: they stay readable in a log file.
            line = f"{st.get('phase') or 'Pending'} {st.get('reason') or ''}".strip()
            if line != last_line:
                bar.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/]  {progress_line(st)}")
                last_line = line
            if st.get("phase") in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"{name} did not finish within {timeout:.0f} s: {progress_line(st)}")
            await asyncio.sleep(interval)
    console.print(f"{name}: {st.get('phase')}: {st.get('message') or ''}")
    for key, uri in (st.get("artifacts") or {}).items():
        console.print(f"  {key}: {uri}")
    return st


def cmd_watch(args: argparse.Namespace) -> int:
    from rich.console import Console

    async def body(kube: Any, ns: str) -> int:
        kwargs = {"timeout": args.timeout, "interval": args.interval}
        st = await watch_job(kube, ns, args.name, Console(), **kwargs)
        return 0 if st.get("phase") in ("Succeeded", "Validated") else 1

    return run_with_kube(args, body)


async def trainer_logs(kube: Any, ns: str, name: str, tail: int | None = None) -> str:
    """The log of the job's newest trainer pod."""
    from kubetune.kube import core_path

    st = (await get_ftj(kube, ns, name)).get("status") or {}
    job = st.get("jobName")
    if not job:
        raise CliError(f"{name} has no trainer Job yet ({st.get('phase') or 'Pending'})")
    pods = await kube.request(
        "GET", core_path("pods", ns), query={"labelSelector": f"batch.kubernetes.io/job-name={job}"}
    )
    items = sorted(
        (pods.body or {}).get("items", []), key=lambda p: p["metadata"]["creationTimestamp"]
    )
    if not items:
        raise CliError(f"no trainer pod of {name} exists (any more)")
    pod = items[-1]["metadata"]["name"]
    query = {"container": "trainer"}
    if tail:
        query["tailLines"] = str(tail)
    status, text = await kube.get_text(core_path("pods", ns, pod) + "/log", query)
    if status != 200:
        raise CliError(f"logs of pod {pod}: HTTP {status}: {text[:300]}")
    return text


def cmd_logs(args: argparse.Namespace) -> int:
    async def body(kube: Any, ns: str) -> int:
        sys.stdout.write(await trainer_logs(kube, ns, args.name, args.tail))
        return 0

    return run_with_kube(args, body)


def with_kube(kubeconfig: str | None, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `body(kube)` with a client for `kubeconfig`, from synchronous code (the demo)."""
    from kubetune.kube import Kube

    async def main() -> Any:
        kube = await Kube.connect(kubeconfig, pool_size=2)
        try:
            return await body(kube)
        finally:
            await kube.close()

    return asyncio.run(main())


def cmd_report(args: argparse.Namespace) -> int:
    async def body(kube: Any, ns: str) -> int:
        st = (await get_ftj(kube, ns, args.name)).get("status") or {}
        uri = (st.get("artifacts") or {}).get("report")
        if not uri:
            raise CliError(
                f"{args.name} has no evaluation report yet (phase {st.get('phase') or 'Pending'})"
            )
        shown = show_report(uri, markdown=args.markdown, raw_json=args.json)
        if not (args.markdown or args.json) and st.get("usage"):
            print(usage_line(st["usage"]))
        return shown

    return run_with_kube(args, body)


def usage_line(usage: dict[str, Any]) -> str:
    """`usage (all attempts): 1.25 GPU-hours, 2 attempts, 1,234,567 tokens, cost 3.75 EUR`."""
    hours, cost = usage_cells(usage)
    parts = [f"{hours} GPU-hours", f"{len(usage.get('attempts') or {})} attempt(s)"]
    if usage.get("tokensTrained"):
        parts.append(f"{usage['tokensTrained']:,} tokens")
    if cost != "-":
        parts.append(f"estimated cost {cost}")
    return "usage (all attempts): " + ", ".join(parts)


def show_report(uri: str, *, markdown: bool, raw_json: bool) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.console import Console
    from rich.markdown import Markdown

    from kubetune.report import render_gate_summary, render_report_table

    s3 = boto3.session.Session().client("s3")
    wanted = uri if markdown else report_json_uri(uri)
    bucket, key = split_s3(wanted)
    try:
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except (BotoCoreError, ClientError) as exc:
        raise CliError(f"{wanted}: {exc}") from None
    if raw_json or markdown:
        print(text)
        return 0
    report = json.loads(text)
    console = Console()
    console.print(Markdown(render_report_table(report)))
    console.print(render_gate_summary(report))
    console.print(f"full report: {uri}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    async def body(kube: Any, ns: str) -> int:
        from kubetune.kube import ftj_path

        await get_ftj(kube, ns, args.name)
        if args.suspend:
            await kube.merge_patch(ftj_path(ns, args.name), {"spec": {"suspend": True}})
            print(f"{args.name} suspended (resume: set spec.suspend false)")
            return 0
        await kube.delete(ftj_path(ns, args.name), propagation="Foreground")
        print(f"{args.name} cancelled: trainer stopped, FineTuneJob deleted; artifacts stay in S3")
        return 0

    return run_with_kube(args, body)


def cmd_serve(args: argparse.Namespace) -> int:
    import yaml as yaml_

    from kubetune import serving

    async def body(kube: Any, ns: str) -> int:
        ftj = await get_ftj(kube, ns, args.name)
        try:
            model = serving.served_model(ftj, merged=args.merged, force=args.force)
            if args.target == "vllm":
                print(serving.render_vllm(model), end="")
            else:
                manifest = serving.build_manifest(model, args.target)
                print(yaml_.safe_dump(manifest, sort_keys=False), end="")
        except serving.ServingError as exc:
            raise CliError(str(exc)) from None
        return 0

    return run_with_kube(args, body)


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(
        name: str, help_: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_)
        p.add_argument("-n", "--namespace", help="namespace (default: the context's)")
        p.add_argument(
            "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
        )
        p.set_defaults(func=func)
        return p

    add("submit", "create the FineTuneJob(s) in FILE", cmd_submit).add_argument("file")
    p = add("list", "list FineTuneJobs", cmd_list)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p = add("watch", "live progress until the job finishes (exit 0 on success)", cmd_watch)
    p.add_argument("name")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    p = add("logs", "the trainer's output", cmd_logs)
    p.add_argument("name")
    p.add_argument("--tail", type=int, help="last N lines only")
    p = add("report", "the evaluation report from S3 (your AWS credentials)", cmd_report)
    p.add_argument("name")
    p.add_argument("--markdown", action="store_true", help="print report.md as is")
    p.add_argument("--json", action="store_true", help="print report.json as is")
    p = add("cancel", "stop a FineTuneJob (deletes it; artifacts stay)", cmd_cancel)
    p.add_argument("name")
    p.add_argument("--suspend", action="store_true", help="suspend instead (resumable)")
    p = add(
        "serve", "a serving manifest for a Succeeded job (pipe to kubectl apply -f -)", cmd_serve
    )
    p.add_argument("name")
    p.add_argument(
        "--target",
        choices=("inferenceservice", "llminferenceservice", "vllm"),
        default="inferenceservice",
        help="KServe InferenceService (default), KServe LLMInferenceService, or `vllm serve`",
    )
    p.add_argument("--merged", action="store_true", help="serve the merged model, no adapter")
    p.add_argument("--force", action="store_true", help="serve even if the evaluation gate failed")
