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
        elif (name := _dynamic_import(node)) is not None:
            names.add(name.split(".")[0])
    return names


def _dynamic_import(node: ast.AST) -> str | None:
    """The module a call `importlib.import_module("x")`, `import_module("x")` or
    `__import__("x")` imports, when it is named by a literal."""
    if not (isinstance(node, ast.Call) and node.args):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
        return first.value if isinstance(first.value, str) else None
    return None


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


def test_the_checker_sees_a_dynamic_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import importlib\n"
        "from importlib import import_module\n"
        "def f():\n"
        "    importlib.import_module('kubetune_devcluster.cli')\n"
        "    import_module('kubetune_cli.main')\n"
        "    __import__('kubetune_trainer')\n"
    )
    assert {"kubetune_devcluster", "kubetune_cli", "kubetune_trainer"} <= imported_modules(module)


def test_the_wheels_commands_name_only_packages_it_ships() -> None:
    """`kubetune` finds its subcommands through entry points: the wheel declares only its
    own; the dev cluster's come from its own distribution (hack/devcluster)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = {
        p.rsplit("/", 1)[-1]
        for p in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    }
    targets = [*project["project"]["scripts"].values()]
    for group in project["project"]["entry-points"].values():
        targets += group.values()
    assert {t.split(":")[0].split(".")[0] for t in targets} <= shipped
    devcluster = tomllib.loads((ROOT / "hack" / "devcluster" / "pyproject.toml").read_text())
    dev_commands = devcluster["project"]["entry-points"]["kubetune.commands"]
    assert {t.split(".")[0] for t in dev_commands.values()} == {"kubetune_devcluster"}


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
    # (cryptography is the operator's too: it verifies progress tokens' signatures.)
    assert "moto" not in base
