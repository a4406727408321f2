"""Reading the FineTuneJob manifest the trainer runs (the pod's downward-API file of its Job's
annotation `kubetune.io/job`, or `kubetune run`'s file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api.errors import describe_validation_error
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.errors import BadInputError


def parse_job(manifest: Any, source: str) -> FineTuneJob:
    """Validate a manifest already parsed into Python objects; `source` names it in errors."""
    if not isinstance(manifest, dict):
        kind = "empty" if manifest is None else f"a {type(manifest).__name__}"
        raise BadInputError(f"{source}: expected a FineTuneJob manifest (a mapping), got {kind}")
    try:
        return FineTuneJob.model_validate(manifest)
    except ValidationError as error:
        raise BadInputError(describe_validation_error(error, source)) from None


def load_job(path: Path) -> FineTuneJob:
    """Load and validate a FineTuneJob from a YAML or JSON file (JSON is YAML, but JSON files
    get JSON's own error messages)."""
    path = Path(path)
    source = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path}: cannot read ({error})") from None
    try:
        manifest = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise BadInputError(
            f"{source}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise BadInputError(f"{source}: invalid YAML{where}: {problem}") from None
    return parse_job(manifest, source)
