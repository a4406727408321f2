"""`kubetune`: one command line for local runs, the dev cluster and cluster users.

Each group of subcommands lives next to the code it drives and registers itself here; a
group whose dependencies are not installed (e.g. `run` without the trainer extra) says so.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides). Each module has `register(subparsers)` adding its commands,
# each command setting `func(args) -> int` as its default.
COMMAND_MODULES = [
    ("kubetune_cli.run", "run a FineTuneJob on this machine"),
    ("kubetune_cli.cluster", "submit, list, watch, logs, report, cancel"),
    ("kubetune_devcluster.cli", "local control plane for tests and the demo"),
    ("kubetune_devcluster.demo", "the full local demo"),
    ("kubetune_cli.crd", "CRD generation"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune LLMs on Kubernetes with FineTuneJob resources."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _ in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name.split(".")[0]):
                continue  # the module itself is not part of this install
            raise
        module.register(subparsers)
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
