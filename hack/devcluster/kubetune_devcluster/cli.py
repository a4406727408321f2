"""`kubetune dev up | down | status`: a local cluster for demos and manual testing.

Wire into the main CLI with `add_dev_commands(subparsers)`; each subcommand sets
`args.func`, which returns the exit code. Standalone: `python -m kubetune_devcluster.cli`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from kubetune_devcluster.binaries import missing_binaries, missing_node_parts
from kubetune_devcluster.controlplane import (
    NODE_RUNTIMES,
    STATE_FILE,
    DevCluster,
    NodeConfig,
    stop_cluster,
)


def default_state_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_DEV_DIR") or Path.home() / ".cache" / "kubetune" / "dev")


def up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if (state_dir / STATE_FILE).exists():
        cluster = DevCluster.from_state(state_dir)
        if len(cluster.alive_processes()) == len(cluster.processes):
            print(f"already running: export KUBECONFIG={cluster.kubeconfig}")
            return 0
        print("found a partly stopped cluster; stopping what is left of it")
        cluster.stop()
    missing = missing_binaries()
    if args.runtime == "containerd":
        missing += missing_node_parts()
    if missing:
        print(
            f"missing: {', '.join(missing)}; run `bash hack/k8s-binaries.sh`"
            + (" (or use --runtime local)" if args.runtime == "containerd" else ""),
            file=sys.stderr,
        )
        return 1
    # Every `up` is a fresh cluster: new certificates would not match old etcd data.
    # What a lost earlier run left (mounts, network) goes first.
    stop_cluster(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
    node = NodeConfig(
        name=args.node_name,
        runtime=args.runtime,
        cpu=args.cpu,
        memory=args.memory,
        gpus=args.gpus,
    )
    try:
        cluster = DevCluster.start(state_dir, node=node, detached=True)
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"dev up: {exc} (logs in {state_dir / 'logs'})", file=sys.stderr)
        return 1
    offers = f"{node.cpu} CPU, {node.memory}, " if node.runtime == "local" else ""
    print(
        f"cluster ready in {cluster.ready_seconds}s at {cluster.server} "
        f"(node {node.name}, {node.runtime}: {offers}{node.gpus} nvidia.com/gpu)"
    )
    print(f"logs:  {state_dir / 'logs'}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.bin_dir}:$PATH   # kubectl and helm {cluster.bin_dir.name}")
    return 0


def down(args: argparse.Namespace) -> int:
    if stop_cluster(Path(args.state_dir)):
        print("cluster stopped")
    else:
        print(f"no cluster recorded in {args.state_dir}")
    return 0


def status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / STATE_FILE).exists():
        print(f"no cluster recorded in {state_dir}")
        return 1
    cluster = DevCluster.from_state(state_dir)
    alive = {record.pid for record in cluster.alive_processes()}
    print(f"server:     {cluster.server}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    print(f"node:       {cluster.node.name} ({cluster.node.runtime})")
    print(f"host:       {cluster.host_address} (reachable from pods)")
    for record in cluster.processes:
        state = "running" if record.pid in alive else "STOPPED"
        print(f"  {record.name:<24} pid {record.pid:<8} {state:<8} log {record.log}")
    return 0 if len(alive) == len(cluster.processes) else 1


def load_image(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / STATE_FILE).exists():
        print(f"no cluster recorded in {state_dir}", file=sys.stderr)
        return 1
    try:
        names = DevCluster.from_state(state_dir).load_image(Path(args.archive))
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"load-image: {exc}", file=sys.stderr)
        return 1
    print(f"loaded {', '.join(names) or 'nothing new'} from {args.archive}")
    return 0


def add_dev_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    dev = subparsers.add_parser("dev", help="a local Kubernetes cluster for demos and tests")
    dev.add_argument(
        "--state-dir",
        default=str(default_state_dir()),
        help="where the cluster keeps its state (default %(default)s)",
    )
    commands = dev.add_subparsers(dest="dev_command", required=True)
    start = commands.add_parser("up", help="start the cluster in the background")
    start.add_argument("--node-name", default="kubetune-local")
    start.add_argument(
        "--runtime",
        choices=NODE_RUNTIMES,
        default="containerd",
        help="containerd: a real kubelet and container runtime (root); local: pods as "
        "host processes (default %(default)s)",
    )
    start.add_argument("--cpu", default="8", help="CPU the local node offers")
    start.add_argument("--memory", default="32Gi", help="memory the local node offers")
    start.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu the node offers")
    start.set_defaults(func=up)
    commands.add_parser("down", help="stop the cluster").set_defaults(func=down)
    commands.add_parser("status", help="show the cluster's processes").set_defaults(func=status)
    load = commands.add_parser(
        "load-image", help="import an image archive (e.g. podman save --format oci-archive)"
    )
    load.add_argument("archive", help="path of the archive")
    load.set_defaults(func=load_image)
    return dev


def register(subparsers: argparse._SubParsersAction) -> None:
    """Hook for the `kubetune` command (kubetune_cli.main)."""
    add_dev_commands(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune")
    add_dev_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
