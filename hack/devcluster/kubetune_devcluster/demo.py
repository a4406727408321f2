"""`kubetune demo`: the whole system on this machine, from an empty start to an evaluated model.

    kubetune demo                 # the real node: kubetune's images, helm install (root)
    kubetune demo --node local    # the process node: no images, no root, about 2 minutes

What it does, in order, and undoes at the end (also on Ctrl-C, SIGTERM or failure):

1. starts the local control plane and its node (kubetune_devcluster): by default the real
   node (kubelet + containerd), else the process node; and an S3 API (moto's server) on a
   free port of the node's host address, which pods reach;
2. writes a tiny model and the instruction data set (kubetune_trainer.demo_assets) and uploads
   them to the S3 locations examples/quickstart-cluster.yaml names;
3. creates the S3 credentials Secret the manifest references and starts the operator. On
   the real node: imports the operator and trainer images (`bash hack/images.sh` builds
   them) and installs the chart with `helm install` (CRD, RBAC, the operator's Deployment
   and Service); trainer pods run the trainer image and report progress to the operator's
   Service. On the process node: applies the CRD and runs the operator as a process, whose
   trainer pods run the project's `kubetune-trainer` as host processes;
4. `kubetune submit`s the manifest and shows its live progress until it finishes;
5. lists the artifacts in S3 and prints the evaluation summary from report.json.

Needs the trainer extra and the dev dependencies (moto): `uv sync --extra trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from kubetune.api import v1alpha1 as api
from kubetune.api.uris import UriError, parse_uri
from kubetune.formatting import human_size
from kubetune_devcluster import stack
from kubetune_devcluster.binaries import cache_dir
from kubetune_devcluster.operatorprocess import OperatorExited, OperatorProcess
from kubetune_devcluster.s3server import S3Endpoint
from kubetune_devcluster.stack import CRD_NAME, REPO_ROOT, StackError

DEFAULT_MANIFEST = REPO_ROOT / "examples" / "quickstart-cluster.yaml"
# The fixed, fake credentials of the throwaway S3 server (it accepts any).
S3_ACCESS_KEY = "kubetune-demo"
S3_SECRET_KEY = "kubetune-demo-secret"


@dataclass(frozen=True)
class DemoSettings:
    """What `kubetune demo` runs; the defaults are the README's demo."""

    manifest: Path = DEFAULT_MANIFEST
    namespace: str = "default"
    timeout_s: float = 600.0  # submit to Succeeded/Failed
    keep: bool = False  # leave everything running until Ctrl-C
    keep_files: bool = False  # keep the work directory (logs, state) afterwards
    # Generic pre-training of the tiny base, so that it knows the words and JSON before the
    # fine-tuning (a random base barely learns in a short LoRA run). None: demo_assets' default.
    pretrain_steps: int | None = None
    # "containerd": the real node, the operator from its image by helm install; "local": the
    # process node, the operator and trainers as host processes.
    node: str = "local"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # a prefix when it ends with '/'


@dataclass
class DemoResult:
    """What the demo saw; the S3 listing and the report were read before teardown."""

    phase: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    artifact_keys: dict[str, int] = field(default_factory=dict)  # key under the run -> size
    report: dict[str, Any] | None = None
    work_dir: Path | None = None
    seconds: float = 0.0


class DemoError(Exception):
    """A one-line reason the demo cannot go on."""


class Interrupted(Exception):
    """SIGTERM/SIGHUP while the demo runs: unwinds like Ctrl-C, so teardown happens."""


# --- pure helpers ---------------------------------------------------------------------


def parse_s3(uri: str, field_name: str) -> S3Location:
    try:
        parsed = parse_uri(uri, schemes=("s3",))
    except UriError as exc:
        raise DemoError(f"{field_name}: the demo needs an s3:// URI with a bucket: {exc}") from None
    return S3Location(parsed.bucket, parsed.key)


@dataclass(frozen=True)
class DemoPlan:
    """Where the demo puts its inputs and finds its outputs, all read from the manifest."""

    name: str
    model: S3Location  # a prefix: the model's files go under it
    dataset: S3Location  # one JSON-lines file
    output: S3Location
    secret_name: str
    buckets: tuple[str, ...]


def plan_from_manifest(manifest: dict[str, Any], namespace: str) -> DemoPlan:
    """The S3 layout and Secret of a FineTuneJob manifest (validated against the API)."""
    job = api.FineTuneJob.model_validate(manifest)
    spec = job.spec
    model = parse_s3(spec.model.uri, "spec.model.uri")
    if model.key and not model.key.endswith("/"):
        model = S3Location(model.bucket, model.key + "/")
    dataset = parse_s3(spec.dataset.uri, "spec.dataset.uri")
    output = parse_s3(spec.output.uri, "spec.output.uri")
    ref = spec.output.credentialsSecretRef
    if ref is None:
        raise DemoError("spec.output.credentialsSecretRef: the demo creates this Secret; set it")
    prefix = output.key if not output.key or output.key.endswith("/") else output.key + "/"
    run = S3Location(output.bucket, f"{prefix}{namespace}/{job.metadata.name}/")
    buckets = tuple(dict.fromkeys((model.bucket, dataset.bucket, output.bucket)))
    return DemoPlan(job.metadata.name, model, dataset, run, ref.name, buckets)


def model_uploads(model_dir: Path, prefix: S3Location) -> list[tuple[Path, str]]:
    """(local file, key) for every file of a saved model, under the model prefix."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return [(p, prefix.key + p.relative_to(model_dir).as_posix()) for p in files]


def artifact_table(run_uri: str, keys: dict[str, int]) -> Table:
    """The run's files; checkpoints folded into one line each (they are many and alike)."""
    table = Table(title=f"Artifacts in {run_uri}", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    checkpoints: dict[str, list[int]] = {}
    for key, size in sorted(keys.items()):
        parts = key.split("/")
        if parts[0] == "checkpoints" and len(parts) > 2:
            checkpoints.setdefault("/".join(parts[:2]) + "/", []).append(size)
            continue
        table.add_row(key, human_size(size))
    for folder, sizes in sorted(checkpoints.items()):
        table.add_row(f"{folder} ({len(sizes)} files)", human_size(sum(sizes)), style="dim")
    return table


def first_sample(report: dict[str, Any]) -> str | None:
    """One held-out example as text: the input, the reference, base and tuned output."""
    samples = report.get("samples") or []
    if not samples:
        return None
    sample = samples[0]
    prompt = sample.get("prompt", "").strip().splitlines()
    # The last prompt line before the response marker is the example's own input.
    shown = next((line for line in reversed(prompt) if line and not line.startswith("#")), "")
    return "\n".join(
        [
            f"input:      {shown}",
            f"reference:  {sample.get('reference', '').strip()}",
            f"base model: {one_line(sample.get('base', ''))}",
            f"tuned:      {one_line(sample.get('tuned', ''))}",
        ]
    )


def one_line(text: str, width: int = 66) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --- the running pieces ---------------------------------------------------------------


def job_seconds(status: dict[str, Any]) -> float | None:
    """Seconds from the job's startTime to its completionTime, when both are set."""
    from datetime import datetime

    start, end = status.get("startTime"), status.get("completionTime")
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def start_s3(host: str) -> S3Endpoint:
    """The throwaway S3 server, with the demo's fixed, fake keys (it accepts any)."""
    try:
        return S3Endpoint(host, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    except ModuleNotFoundError as exc:
        raise DemoError(str(exc)) from None


def list_keys(s3: Any, location: S3Location) -> dict[str, int]:
    """Key (relative to the prefix) -> size of every object under a prefix."""
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=location.key
    )
    return {
        obj["Key"][len(location.key) :]: obj["Size"]
        for page in pages
        for obj in page.get("Contents", [])
    }


def cached_demo_model(directory: Path, steps: int, write: Callable[..., Path]) -> Path:
    """The demo's pre-trained tiny model in `directory`: made once (its pre-training is
    most of a warm demo's wait), then copied from a cache keyed by what makes it (the
    module that writes it, the step count, torch and transformers)."""
    import torch
    import transformers

    from kubetune_trainer import demo_assets

    made_by = Path(demo_assets.__file__).read_bytes()
    made_by += f"{steps} {torch.__version__} {transformers.__version__}".encode()
    cached = cache_dir() / "demo-model" / hashlib.sha256(made_by).hexdigest()[:16]
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        making = Path(tempfile.mkdtemp(prefix=".making-", dir=cached.parent))
        try:
            write(making / "model", pretrain_steps=steps)
            with contextlib.suppress(OSError):  # another demo made it first
                (making / "model").rename(cached)
        finally:
            shutil.rmtree(making, ignore_errors=True)
    shutil.copytree(cached, directory)
    return directory


def prepare_inputs(
    plan: DemoPlan, s3: Any, work_dir: Path, pretrain_steps: int | None
) -> tuple[int, float]:
    """Write the tiny model and the data set, upload them; returns (files, seconds)."""
    try:
        from kubetune_trainer.demo_assets import (
            DEMO_PRETRAIN_STEPS,
            write_demo_dataset,
            write_tiny_model,
        )
    except ModuleNotFoundError:
        raise DemoError(
            "the trainer extra is not installed: run `uv sync --extra trainer`"
        ) from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars
    started = time.monotonic()
    steps = DEMO_PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    model_dir = cached_demo_model(work_dir / "assets" / "model", steps, write_tiny_model)
    data = write_demo_dataset(work_dir / "assets" / "train.jsonl")
    for bucket in plan.buckets:
        s3.create_bucket(Bucket=bucket)
    uploads = [*model_uploads(model_dir, plan.model), (data, plan.dataset.key)]
    for path, key in uploads[:-1]:
        s3.upload_file(str(path), plan.model.bucket, key)
    s3.upload_file(str(data), plan.dataset.bucket, plan.dataset.key)
    return len(uploads), time.monotonic() - started


def create_secret(cluster: Any, namespace: str, name: str, data: dict[str, str]) -> None:
    cluster.rest().post(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
    )


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Interrupted` in the main thread, so `finally` tears down."""

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def watch_and_tail(
    cluster: Any, settings: DemoSettings, name: str, console: Console
) -> dict[str, Any]:
    """`kubetune watch NAME`; on failure, the tail of `kubetune logs NAME`."""
    from kubetune_cli.cluster import CliError, trainer_logs, watch_job, with_kube

    kubeconfig, ns = str(cluster.kubeconfig), settings.namespace

    async def watch(kube: Any) -> dict[str, Any]:
        return await watch_job(kube, ns, name, console, timeout=settings.timeout_s, interval=1.0)

    try:
        status = with_kube(kubeconfig, watch)
    except CliError as exc:
        raise DemoError(str(exc)) from None
    if status.get("phase") != "Succeeded" and status.get("jobName"):
        with contextlib.suppress(CliError):
            tail = with_kube(kubeconfig, lambda kube: trainer_logs(kube, ns, name, 15))
            console.print("[bold]last lines of the trainer's log:[/]")
            console.print(tail, markup=False, highlight=False)
    return status


# --- the demo -------------------------------------------------------------------------


def start_operator(
    cluster: Any, s3_endpoint: S3Endpoint, work_dir: Path, console: Console, *, real_node: bool
) -> OperatorProcess | None:
    """The operator: from its image by `helm install` on the real node (None: the cluster
    owns it), or as a process of this one on the process node."""
    try:
        if real_node:
            install_chart(cluster, s3_endpoint, work_dir, console)
            return None
        stack.install_crd(cluster)
        console.print(f"CRD {CRD_NAME} installed")
        operator = OperatorProcess(
            cluster,
            work_dir / "operator.log",
            extra_args=["--s3-region", s3_endpoint.region, "--log-format", "text"],
        )
        operator.start()
    except (StackError, OperatorExited, TimeoutError) as exc:
        raise DemoError(str(exc)) from None
    console.print(f"operator ready at {operator.url} (log {operator.log_path})")
    return operator


def node_images(real_node: bool) -> list[str]:
    """The operator and trainer images a real node starts with (from the image store kept
    across clusters: a second demo imports nothing)."""
    archives = stack.image_archives().values() if real_node else ()
    return [str(archive) for archive in archives if archive.is_file()]


def install_chart(cluster: Any, s3_endpoint: S3Endpoint, work_dir: Path, console: Console) -> None:
    """Both images into the node, then the chart: trainer resources a small machine has."""
    for ref, seconds in stack.load_images(cluster).items():
        console.print(f"imported {ref} in {seconds:.0f} s")
    values = stack.ChartValues(s3_endpoint=s3_endpoint.url, s3_region=s3_endpoint.region)
    stack.helm_install(cluster, values, log_path=work_dir / "helm.log")
    console.print(
        f"helm install kubetune: operator {stack.image_ref('operator')} running in "
        f"{stack.OPERATOR_NAMESPACE}, trainer image {stack.image_ref('trainer')}, CRD {CRD_NAME}"
    )


def show_results(
    s3: Any, plan: DemoPlan, result: DemoResult, console: Console, step: Callable[[str], None]
) -> None:
    """The run's artifacts in S3, then the evaluation summary and one held-out example."""
    from kubetune.report import render_gate_summary, render_report_table

    run_uri = f"s3://{plan.output.bucket}/{plan.output.key}"
    result.artifact_keys = list_keys(s3, plan.output)
    step("artifacts")
    console.print(artifact_table(run_uri, result.artifact_keys))
    report_key = next((k for k in result.artifact_keys if k.endswith("report.json")), None)
    if not report_key:
        return
    body = s3.get_object(Bucket=plan.output.bucket, Key=plan.output.key + report_key)
    result.report = json.loads(body["Body"].read())
    step("evaluation: base model vs fine-tuned, on held-out examples")
    console.print(Markdown(render_report_table(result.report)))
    console.print(render_gate_summary(result.report))
    sample = first_sample(result.report)
    if sample:
        console.print("\n[bold]one held-out example[/]")
        console.print(sample, markup=False, highlight=False)


def run_demo(
    settings: DemoSettings,
    console: Console,
    *,
    before_teardown: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Run the whole demo and tear it down; `before_teardown(context)` sees the running
    system (keys: cluster, s3, plan, operator) after the summary, e.g. for tests."""
    from kubetune_cli.cluster import CliError, load_manifests
    from kubetune_cli.main import main as kubetune_cli
    from kubetune_devcluster.binaries import missing_binaries
    from kubetune_devcluster.controlplane import DevCluster, NodeConfig

    started = time.monotonic()
    try:
        # The same checks and one-line messages as `kubetune submit`.
        manifest = load_manifests(Path(settings.manifest))[0]
    except CliError as exc:
        raise DemoError(str(exc)) from None
    plan = plan_from_manifest(manifest, settings.namespace)
    missing = missing_binaries()
    if missing:
        raise DemoError(
            f"missing Kubernetes binaries ({', '.join(missing)}): run `bash hack/k8s-binaries.sh`"
        )
    result = DemoResult(work_dir=Path(tempfile.mkdtemp(prefix="kubetune-demo-")))
    work_dir = result.work_dir
    cluster = s3_endpoint = operator = None
    real_node = settings.node == "containerd"

    def step(text: str) -> None:
        console.print(f"\n[bold]==> {text}[/]  [dim]({time.monotonic() - started:.0f} s)[/]")

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with signals_unwind():
            node_name = "real node" if real_node else "local node"
            step(f"local control plane and {node_name}")
            cluster = DevCluster.start(
                work_dir / "cluster",
                node=NodeConfig(runtime=settings.node, gpus=0, images=node_images(real_node)),
                ready_timeout=240 if real_node else 120,
            )
            console.print(
                f"Kubernetes API at {cluster.server} (ready in {cluster.ready_seconds} s)"
            )

            step("S3 endpoint, tiny model and data")
            s3_endpoint = start_s3(cluster.host_address)
            s3 = s3_endpoint.client()
            console.print(f"S3 API at {s3_endpoint.url}")
            # The inputs are made while the operator starts: both take a while.
            inputs = pool.submit(prepare_inputs, plan, s3, work_dir, settings.pretrain_steps)
            create_secret(cluster, settings.namespace, plan.secret_name, s3_endpoint.env)
            console.print(f"Secret {settings.namespace}/{plan.secret_name}: S3 endpoint and keys")

            step("operator")
            operator = start_operator(cluster, s3_endpoint, work_dir, console, real_node=real_node)

            files, seconds = inputs.result()
            console.print(
                f"uploaded {files} files to s3://{plan.model.bucket}/{plan.model.key} and "
                f"s3://{plan.dataset.bucket}/{plan.dataset.key} (made in {seconds:.0f} s)"
            )

            step(f"kubetune submit {display_path(settings.manifest)}")
            argv = ["--kubeconfig", str(cluster.kubeconfig), "-n", settings.namespace]
            if kubetune_cli(["submit", str(settings.manifest), *argv]) != 0:
                raise DemoError("kubetune submit failed (see above)")

            step(f"kubetune watch {plan.name}")
            # What `kubetune watch` and `kubetune logs` do, on the demo's console.
            status = watch_and_tail(cluster, settings, plan.name, console)
            result.status, result.phase = status, status.get("phase")

            show_results(s3, plan, result, console, step)
            took = job_seconds(status)
            if took is not None:
                tokens = (status.get("metrics") or {}).get("tokensTrained") or 0
                console.print(f"\nthe job took {took:.0f} s ({tokens:,} tokens trained)")
            if result.phase == "Succeeded":
                # The hand-off to serving (docs/serving.md): KServe on a GPU cluster.
                console.print(
                    f"serve it: kubetune serve {plan.name} | kubectl apply -f -"
                    f"   (--target vllm for a plain vLLM server)",
                    markup=False,
                )

            if before_teardown is not None:
                before_teardown({"cluster": cluster, "s3": s3, "plan": plan, "operator": operator})
            if settings.keep:
                keep_running(console, cluster, s3_endpoint, plan)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        result.seconds = time.monotonic() - started
        console.print(f"\n[bold]==> tearing down[/]  [dim]({result.seconds:.0f} s)[/]")
        if operator is not None:
            operator.stop()
        if cluster is not None:
            cluster.stop()  # the node agent first: it stops the trainer's processes
        if s3_endpoint is not None:
            s3_endpoint.stop()
        if settings.keep_files:
            console.print(f"logs and state kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return result


def keep_running(console: Console, cluster: Any, s3_endpoint: S3Endpoint, plan: DemoPlan) -> None:
    env = {"KUBECONFIG": str(cluster.kubeconfig), **s3_endpoint.env}
    console.print("\n[bold]Everything keeps running until Ctrl-C.[/] In another shell:")
    for key, value in env.items():
        console.print(f"  export {key}={value}", markup=False)
    console.print(f"  export PATH={cluster.bin_dir}:$PATH", markup=False)
    console.print(f"  kubetune list; kubetune report {plan.name}; kubectl get pods", markup=False)
    threading.Event().wait()  # until Ctrl-C / SIGTERM


def display_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def demo_command(args: argparse.Namespace) -> int:
    console = Console()
    settings = DemoSettings(
        manifest=args.manifest,
        timeout_s=args.timeout,
        keep=args.keep,
        keep_files=args.keep_files,
        node=args.node,
    )
    try:
        result = run_demo(settings, console)
    except DemoError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    except (KeyboardInterrupt, Interrupted):
        console.print("interrupted; everything the demo started is stopped")
        return 130
    console.print(f"demo finished in {result.seconds:.0f} s: {result.phase}")
    return 0 if result.phase == "Succeeded" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the full local demo: control plane, S3, operator, a fine-tuning job",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=DEFAULT_MANIFEST,
        help="FineTuneJob with s3:// URIs and a credentialsSecretRef (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DemoSettings.timeout_s, help="seconds for the job"
    )
    parser.add_argument(
        "--node",
        choices=("containerd", "local"),
        default="containerd",
        help="containerd: the real node, kubetune's images, helm install (root; default); "
        "local: the process node, operator and trainer as host processes",
    )
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    parser.add_argument(
        "--keep-files", action="store_true", help="keep logs and state in the work directory"
    )
    parser.set_defaults(func=demo_command)
