"""Generate the FineTuneJob CRD from the pydantic models.

    python -m kubetune.api.crd            # rewrite crds/kubetune.io_finetunejobs.yaml
    python -m kubetune.api.crd --check    # exit 1 when the file differs from the models

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema: no $ref,
no anyOf for optionals, `exclusiveMinimum` as a boolean, explicit types everywhere.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import v1alpha1 as api

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml"

# Keys of JSON Schema that a structural OpenAPI v3 schema keeps as they are.
_KEPT_KEYS = {
    "type", "description", "default", "enum", "format", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip


def _openapi(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description/default win
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        if node.get("default", ...) is None:
            del node["default"]
        return _openapi({**options[0], **node}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT_KEYS}
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True

    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        return out
    if "properties" in node:
        out["type"] = "object"
        required = set(node.get("required", []))
        out["properties"] = {}
        for name, prop in node["properties"].items():
            nullable = "anyOf" in prop
            converted = _openapi(prop, defs)
            # A non-nullable nested object with a default_factory: default it to {} so the
            # API server fills in its fields' defaults (training, evaluation, resources).
            if (
                name not in required
                and not nullable
                and converted.get("type") == "object"
                and "properties" in converted
                and "default" not in converted
            ):
                converted["default"] = {}
            out["properties"][name] = converted
        if required:
            out["required"] = sorted(required)
    elif "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
        out["type"] = "object"
        out["additionalProperties"] = _openapi(node["additionalProperties"], defs)
    elif node.get("type") == "array":
        out["items"] = _openapi(node["items"], defs)
    return out


def model_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _openapi(raw, raw.get("$defs", {}))


def _immutable_after_start_rules() -> list[dict[str, str]]:
    # Root-level transition rules: the root is the only place that sees both spec and status.
    started = "has(oldSelf.status) && has(oldSelf.status.startTime)"
    return [
        {
            "rule": f"!({started}) || self.spec.{field} == oldSelf.spec.{field}",
            "message": f"spec.{field} cannot change after the job has started",
            "fieldPath": f".spec.{field}",
            "reason": "FieldValueForbidden",
        }
        for field in api.IMMUTABLE_AFTER_START
    ]


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # `kubectl get ftj -o wide`: what the job used, for chargeback.
    {
        "name": "GPU-Seconds",
        "type": "number",
        "jsonPath": ".status.usage.gpuSeconds",
        "priority": 1,
        "description": "GPU-seconds over all attempts",
    },
    {"name": "Cost", "type": "number", "jsonPath": ".status.usage.estimatedCost", "priority": 1},
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "priority": 1,
        "description": "Trainer pods that failed and were retried (status.attempts has each)",
    },
]


def build_crd() -> dict[str, Any]:
    spec_schema = model_schema(api.FineTuneJobSpec)
    spec_schema["description"] = api.FineTuneJobSpec.__doc__.strip()
    status_schema = model_schema(api.FineTuneJobStatus)
    status_schema["description"] = api.FineTuneJobStatus.__doc__.strip()
    root = {
        "type": "object",
        "description": "FineTuneJob fine-tunes a base LLM (full, LoRA or QLoRA) and publishes "
        "the result with its evaluation report.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": _immutable_after_start_rules(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m kubetune.api.crd` from kubetune/api/v1alpha1.py. Do not edit.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    parser.add_argument("--out", type=Path, default=CRD_PATH)
    args = parser.parse_args(argv)
    text = render_crd()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python -m kubetune.api.crd", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
