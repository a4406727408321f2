"""The layers import only downward, and the base install stays torch- and dev-cluster-free.

foundation (kubetune) -> operator, trainer -> command line (kubetune_cli) -> dev cluster.
Imports inside functions count too: a lazy import upward is still a dependency upward.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> (folder, rank); a package may import packages of a lower rank, and itself.
LAYERS = {
    "kubetune": (ROOT / "kubetune", 0),
    "kubetune_operator": (ROOT / "operator" / "kubetune_operator", 1),
    "kubetune_trainer": (ROOT / "trainer" / "kubetune_trainer", 1),
    "kubetune_cli": (ROOT / "cli" / "kubetune_cli", 2),
    "kubetune_devcluster": (ROOT / "hack" / "devcluster" / "kubetune_devcluster", 3),
}
HEAVY = {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module the file imports, lazily or not."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def upward_imports(package: str) -> list[str]:
    folder, rank = LAYERS[package]
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in imported_modules(path):
            if name in LAYERS and name != package and LAYERS[name][1] >= rank:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_go_only_downward(package: str) -> None:
    assert upward_imports(package) == []


def test_the_checker_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from kubetune_cli.main import main\n")
    assert "kubetune_cli" in imported_modules(module)


def test_foundation_needs_no_torch() -> None:
    folder, _ = LAYERS["kubetune"]
    heavy = {
        f"{p.relative_to(ROOT)}: {sorted(imported_modules(p) & HEAVY)}"
        for p in folder.rglob("*.py")
        if imported_modules(p) & HEAVY
    }
    assert heavy == set()


def test_the_wheel_ships_no_dev_cluster_and_its_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert not any("devcluster" in p for p in packages)
    base = " ".join(project["project"]["dependencies"])
    assert "cryptography" not in base and "moto" not in base
