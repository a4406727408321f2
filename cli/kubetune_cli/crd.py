"""`kubetune crd`: print or check the generated CRD."""

from __future__ import annotations

import argparse

from kubetune.api import crd


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "crd", help="print the FineTuneJob CRD (generated from the API types)"
    )
    parser.add_argument("--check", action="store_true", help="fail when crds/ is stale")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.check:
        return crd.main(["--check"])
    print(crd.render_crd(), end="")
    return 0
