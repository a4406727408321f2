"""Format compliance: does a generated answer have the shape `spec.evaluation.format` asks for."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from kubetune.api.v1alpha1 import FormatCheck
from kubetune_trainer.errors import BadInputError

FormatChecker = Callable[[str], bool]

_FIELD = "spec.evaluation.format"


def _parses_as_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def build_format_checker(check: FormatCheck) -> FormatChecker:
    """A predicate on one generated output (surrounding whitespace ignored).

    The schema or pattern is compiled here, once, so a bad one is reported before any
    generation as a BadInputError naming the field.
    """
    if check.type == "json":
        return lambda output: _parses_as_json(output.strip())[0]
    if check.type == "jsonSchema":
        return _json_schema_checker(check.schema_ or {})
    if check.type == "regex":
        return _regex_checker(check.pattern or "")
    raise BadInputError(f"{_FIELD}.type: unsupported format check {check.type!r}")


def _json_schema_checker(schema: dict[str, Any]) -> FormatChecker:
    import jsonschema
    from jsonschema.exceptions import SchemaError

    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except SchemaError as error:
        raise BadInputError(f"{_FIELD}.schema: invalid JSON Schema: {error.message}") from None
    validator = validator_class(schema)

    def complies(output: str) -> bool:
        ok, value = _parses_as_json(output.strip())
        return ok and validator.is_valid(value)

    return complies


def _regex_checker(pattern: str) -> FormatChecker:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise BadInputError(f"{_FIELD}.pattern: invalid regular expression: {error}") from None
    return lambda output: compiled.fullmatch(output.strip()) is not None
