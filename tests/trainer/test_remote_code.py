"""A model repository that would run its own Python code is refused unless the spec allows it.

The repository here is real: its config names a configuration class in a .py file of its
own (auto_map), and that file leaves a marker when imported. Refused, nothing runs; allowed,
transformers imports the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from kubetune.api.v1alpha1 import ModelSource
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.model_source import resolve_model

CONFIG_CODE = """
from pathlib import Path
from transformers import PretrainedConfig

Path(MARKER).write_text("yes")


class RemoteConfig(PretrainedConfig):
    model_type = "kubetune-remote-test"
"""


def remote_code_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    # transformers copies the code into its module cache: the marker path is absolute.
    code = CONFIG_CODE.replace("MARKER", repr(str(root / "code-ran")))
    (root / "configuration_remote.py").write_text(code)
    config = {
        "model_type": "kubetune-remote-test",
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"},
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_remote_code_is_refused_by_default_and_nothing_runs(tmp_path: Path) -> None:
    repo = remote_code_repo(tmp_path / "model")
    with pytest.raises(BadInputError) as error:
        resolve_model(ModelSource(uri=f"file://{repo}"), tmp_path / "cache")
    assert str(error.value) == (
        f"file://{repo}: the model runs its own Python code (auto_map in config.json); "
        "set spec.model.trustRemoteCode: true only if you trust it"
    )
    assert not (repo / "code-ran").exists()


def test_remote_code_runs_when_the_spec_allows_it(tmp_path: Path) -> None:
    repo = remote_code_repo(tmp_path / "model")
    source = ModelSource(uri=f"file://{repo}", trustRemoteCode=True)
    assert resolve_model(source, tmp_path / "cache") == repo
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    assert type(config).__name__ == "RemoteConfig"
    assert (repo / "code-ran").read_text() == "yes"


def test_an_ordinary_model_needs_no_permission(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = ModelSource(uri=f"file://{tiny_model_dir}")
    assert resolve_model(source, tmp_path / "cache") == tiny_model_dir
