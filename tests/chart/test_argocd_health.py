"""The Argo CD health check for FineTuneJob, run in real Lua against objects of every phase.

Argo CD evaluates health checks with gopher-lua (Lua 5.1); each case runs under Lua 5.1 and
5.4 so the script sticks to what both accept.
"""

from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import v1alpha1 as api

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "helm" / "kubetune" / "files" / "argocd-health.lua"
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"
LUA_RUNTIMES = ["lupa.lua51", "lupa.lua54"]


def _to_lua(lua: Any, value: Any) -> Any:
    """Python JSON values as Lua values, the way Argo CD hands an object to a health check."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def run_health_check(obj: dict[str, Any], runtime: str = "lupa.lua51") -> dict[str, str]:
    lupa_module = importlib.import_module(runtime)
    lua = lupa_module.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(HEALTH_LUA.read_text())
    return dict(result.items())


def ftj(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "generation": generation},
        "spec": {"method": "lora"},
    }
    if status is not None:
        obj["status"] = status
    return obj


CASES = [
    pytest.param(ftj(None), "Progressing", "Waiting for the operator", id="no-status"),
    pytest.param(ftj({}), "Progressing", "Waiting for the operator", id="empty-status"),
    pytest.param(
        ftj({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
        "Progressing",
        "observe generation 2",
        id="observed-generation-behind",
    ),
    pytest.param(
        ftj({"phase": "Running", "message": "old"}, generation=1),
        "Progressing",
        "observe generation 1",
        id="observed-generation-missing",
    ),
    pytest.param(
        ftj({"phase": "Pending", "observedGeneration": 1}), "Progressing", "Pending", id="pending"
    ),
    pytest.param(
        ftj({"phase": "Queued", "observedGeneration": 1, "message": "waiting in queue gpu-a"}),
        "Suspended",
        "waiting in queue gpu-a",
        id="queued",
    ),
    pytest.param(
        ftj({"phase": "Suspended", "observedGeneration": 1}),
        "Suspended",
        "Suspended",
        id="suspended",
    ),
    pytest.param(
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "progress": {"step": 120, "totalSteps": 300, "summary": "120/300 (40%)"},
            }
        ),
        "Progressing",
        "Running: 120/300 (40%)",
        id="running-summary",
    ),
    pytest.param(
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "progress": {"step": 7, "totalSteps": 50},
            }
        ),
        "Progressing",
        "Running: step 7/50",
        id="running-steps-only",
    ),
    pytest.param(
        ftj({"phase": "Succeeded", "observedGeneration": 1, "message": "eval passed"}),
        "Healthy",
        "eval passed",
        id="succeeded",
    ),
    pytest.param(
        ftj({"phase": "Validated", "observedGeneration": 1, "message": "1000 rows, 92% packed"}),
        "Healthy",
        "1000 rows, 92% packed",
        id="validated",
    ),
    pytest.param(
        ftj(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "reason": "BadInput",
                "message": "data.jsonl: row 3: missing field 'output'",
            }
        ),
        "Degraded",
        "BadInput: data.jsonl: row 3: missing field 'output'",
        id="failed",
    ),
    pytest.param(
        ftj({"phase": "Failed", "observedGeneration": 1}),
        "Degraded",
        "Fine-tuning failed",
        id="failed-no-message",
    ),
]


@pytest.mark.parametrize("runtime", LUA_RUNTIMES)
@pytest.mark.parametrize(("obj", "expected_status", "message_fragment"), CASES)
def test_health_of_every_phase(
    obj: dict[str, Any], expected_status: str, message_fragment: str, runtime: str
) -> None:
    health = run_health_check(obj, runtime)
    assert health["status"] == expected_status
    assert message_fragment in health["message"]


def test_every_phase_of_the_api_is_covered() -> None:
    from kubetune.api.v1alpha1 import PHASES

    covered = {p.values[0].get("status", {}).get("phase") for p in CASES} - {None}
    assert covered == set(PHASES)


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        (ROOT / "deploy" / "argocd" / "argocd-cm-values.yaml", ["configs", "cm", HEALTH_KEY]),
        (ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml", ["data", HEALTH_KEY]),
    ],
    ids=["argo-cd-chart-values", "argocd-cm-patch"],
)
def test_shipped_snippets_carry_the_same_lua(path: Path, keys: list[str]) -> None:
    node: Any = yaml.safe_load(path.read_text())
    for key in keys:
        node = node[key]
    assert node == HEALTH_LUA.read_text()


def test_example_application_points_at_finetunejobs() -> None:
    """The example Application syncs a folder of FineTuneJob manifests (the shipped examples
    are such files), and the health check it relies on is keyed to that very kind."""
    app = yaml.safe_load((ROOT / "deploy" / "argocd" / "application.yaml").read_text())
    assert app["kind"] == "Application"
    include = app["spec"]["source"]["directory"]["include"]
    jobs = [
        path
        for path in sorted((ROOT / "examples").iterdir())
        if any((doc or {}).get("kind") == api.KIND for doc in yaml.safe_load_all(path.read_text()))
    ]
    assert jobs and all(fnmatch.fnmatch(path.name, include) for path in jobs)
    assert f"resource.customizations.health.{api.GROUP}_{api.KIND}" == HEALTH_KEY
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert app["spec"]["destination"]["namespace"]
