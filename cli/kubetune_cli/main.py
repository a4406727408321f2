"""`kubetune`: one command line for local runs, the dev cluster and cluster users.

Each group of subcommands lives next to the code it drives and registers itself here; a
group whose dependencies are not installed (e.g. `run` without the trainer extra) says so.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points

# Each installed distribution adds its subcommand groups under this entry-point group: the
# wheel its own (run, cluster, crd), a dev checkout's kubetune-devcluster the dev cluster and
# the demo. Each is `register(subparsers)`, each command setting `func(args) -> int`.
COMMANDS_GROUP = "kubetune.commands"
# Shown first, in this order; any other group follows by name.
FIRST = ("run", "preview", "cluster", "dev", "demo", "crd")


def command_entry_points() -> list[EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}
    order = {name: i for i, name in enumerate(FIRST)}
    return sorted(found.values(), key=lambda ep: (order.get(ep.name, len(order)), ep.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune LLMs on Kubernetes with FineTuneJob resources."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry_point in command_entry_points():
        try:
            register = entry_point.load()
        except ModuleNotFoundError as exc:
            if exc.name and entry_point.module.startswith(exc.name.split(".")[0]):
                continue  # declared by an install whose package is gone: nothing to add
            raise
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
