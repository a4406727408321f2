"""`kubetune preview job.yaml [--rows N] [--json]`: what a FineTuneJob would train on.

Runs the trainer's own model-source and dataset stages (no training, no GPU, no model
weights loaded) and prints the first rows as tokenised, the tokens that carry loss
highlighted, and totals. Any input the real run would refuse is refused here with the same
one-line message and exit code 3.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kubetune.api.contract import ENV_WORK_DIR, EXIT_BAD_INPUT, EXIT_FAILURE
from kubetune_cli.run import DEFAULT_LOCAL_WORK_DIR


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "preview",
        help="show what a FineTuneJob would train on, without training",
        description="Run the trainer's data stage on this machine and show the first rows as "
        "tokenised, with the tokens that carry loss marked, and totals.",
    )
    parser.add_argument("manifest", type=Path, help="FineTuneJob manifest (YAML or JSON)")
    parser.add_argument("--rows", type=int, default=3, help="rows to show (default 3)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document: per row a list of {text, trained} segments, and totals",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"scratch space (default: ${ENV_WORK_DIR} or {DEFAULT_LOCAL_WORK_DIR}/<name>)",
    )
    parser.set_defaults(func=preview_command)


def print_preview(console: Any, document: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    for row in document["rows"]:
        console.print(
            Text.assemble(
                (row["ref"], "bold"),
                f"  {row['tokens']} tokens, {row['trained_tokens']} carry loss (",
                ("highlighted", "bold green"),
                ")",
            )
        )
        text = Text()
        for segment in row["segments"]:
            text.append(segment["text"], style="bold green" if segment["trained"] else "dim")
        console.print(text)
        console.print()
    totals = document["totals"]
    table = Table(title="Totals", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    efficiency = totals["packing_efficiency"]
    memory = totals["memory_estimate_gib_per_gpu"]
    for name, value in [
        ("format", totals["format"]),
        ("training rows", f"{totals['train_rows']:,}"),
        ("validation rows", f"{totals['validation_rows']:,}"),
        ("tokens", f"{totals['tokens']:,} ({totals['trained_tokens']:,} carry loss)"),
        ("truncated rows", str(totals["truncated_rows"])),
        (
            "excluded rows",
            f"{totals['excluded_rows']}"
            + (f": {'; '.join(totals['excluded_examples'])}" if totals["excluded_rows"] else ""),
        ),
        ("packing", "on" if totals["packing"] else "off"),
        ("packing efficiency", "-" if efficiency is None else f"{efficiency:.1%}"),
        ("sequences per epoch", f"{totals['sequences']:,}"),
        ("steps per epoch", f"{totals['steps_per_epoch']:,}"),
        ("parameters", "-" if totals["parameters"] is None else f"{totals['parameters']:,}"),
        ("GPU memory estimate", "-" if memory is None else f"{memory:g} GiB per GPU"),
    ]:
        table.add_row(name, value)
    console.print(table)
    for note in document["notes"]:
        console.print(Text(f"note: {note}", style="yellow"))


def preview_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from kubetune_trainer.errors import BadInputError

    console = Console()
    errors = Console(stderr=True, soft_wrap=True)  # the message stays one line
    try:
        from kubetune_trainer.config import load_job
        from kubetune_trainer.preview import preview_job
        from kubetune_trainer.progress import quiet_libraries

        quiet_libraries()
        job = load_job(args.manifest)
        work_dir = args.work_dir or Path(
            os.environ.get(ENV_WORK_DIR) or DEFAULT_LOCAL_WORK_DIR / job.metadata.name
        )
        preview = preview_job(job, work_dir, rows=max(args.rows, 0))
    except BadInputError as error:
        # Text, not markup: messages hold brackets such as `spec.tolerations[0]`.
        errors.print(Text.assemble(("error: ", "bold red"), str(error)))
        return EXIT_BAD_INPUT
    except Exception as error:  # e.g. the hub or S3 unreachable: a run would retry this
        from kubetune_trainer.errors import one_line

        reason = one_line(str(error)) or type(error).__name__
        errors.print(Text.assemble(("error: ", "bold red"), f"cannot preview: {reason}"))
        return EXIT_FAILURE
    document = preview.document()
    if args.json:
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        print_preview(console, document)
    return 0
