"""Resolving the base model: hub cache (offline), S3 sync, pvc:// and file:// paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import ModelSource
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.model_source import resolve_model
from tests.fixtures.s3 import S3Server


def model_error(source: ModelSource, cache_dir: Path) -> str:
    with pytest.raises(BadInputError) as caught:
        resolve_model(source, cache_dir)
    return str(caught.value)


def make_model_dir(path: Path, marker: str = "base") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(f'{{"marker": "{marker}"}}')
    return path


# --- hf:// ------------------------------------------------------------------------------


def add_to_hub_cache(hub_cache: Path, repo_id: str, commit: str, ref: str | None) -> Path:
    """One snapshot in huggingface_hub's cache layout (what snapshot_download writes)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = make_model_dir(repo / "snapshots" / commit, marker=commit)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.mark.usefixtures("offline_hub")
def test_hf_model_from_the_cache_honours_revision(tmp_path: Path) -> None:
    hub = tmp_path / "cache" / "huggingface"
    main = add_to_hub_cache(hub, "org/tiny", "a" * 40, ref="main")
    tagged = add_to_hub_cache(hub, "org/tiny", "b" * 40, ref="v1")
    cache = tmp_path / "cache"
    assert resolve_model(ModelSource(uri="hf://org/tiny"), cache) == main
    assert resolve_model(ModelSource(uri="hf://org/tiny", revision="v1"), cache) == tagged
    by_commit = ModelSource(uri="hf://org/tiny", revision="b" * 40)
    assert resolve_model(by_commit, cache) == tagged


@pytest.mark.usefixtures("offline_hub")
def test_hf_model_uses_a_prefilled_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = add_to_hub_cache(tmp_path / "hf-home" / "hub", "org/tiny", "c" * 40, ref="main")
    assert resolve_model(ModelSource(uri="hf://org/tiny"), tmp_path / "job-cache") == snapshot


@pytest.mark.usefixtures("offline_hub")
def test_hf_model_missing_offline(tmp_path: Path) -> None:
    add_to_hub_cache(tmp_path / "huggingface", "org/tiny", "a" * 40, ref="main")
    assert model_error(ModelSource(uri="hf://org/absent"), tmp_path) == (
        "model not found: hf://org/absent (not in the local cache and HF_HUB_OFFLINE is set)"
    )
    assert model_error(ModelSource(uri="hf://org/tiny", revision="v9"), tmp_path) == (
        "model not found: hf://org/tiny at revision 'v9' "
        "(not in the local cache and HF_HUB_OFFLINE is set)"
    )


# --- s3:// ------------------------------------------------------------------------------


def test_s3_model_synced_once(s3_env: str, s3_server: S3Server, tmp_path: Path) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_env, Key="models/tiny/config.json", Body=b'{"marker": "s3"}')
    client.put_object(Bucket=s3_env, Key="models/tiny/model.safetensors", Body=b"weights!")
    path = resolve_model(ModelSource(uri=f"s3://{s3_env}/models/tiny"), tmp_path)
    assert path == tmp_path / "s3" / s3_env / "models/tiny"
    assert (path / "model.safetensors").read_bytes() == b"weights!"

    # A restart finds the files in the cache (same size and ETag) and keeps them.
    (path / "model.safetensors").write_bytes(b"cached!!")
    again = resolve_model(ModelSource(uri=f"s3://{s3_env}/models/tiny/"), tmp_path)
    assert again == path
    assert (path / "model.safetensors").read_bytes() == b"cached!!"


def test_s3_model_missing(s3_env: str, tmp_path: Path) -> None:
    source = ModelSource(uri=f"s3://{s3_env}/models/absent")
    assert model_error(source, tmp_path) == f"model not found: s3://{s3_env}/models/absent"


def test_s3_model_bucket_missing(s3_env: str, tmp_path: Path) -> None:
    source = ModelSource(uri="s3://no-such-bucket-kt/models/tiny")
    assert model_error(source, tmp_path) == "s3://no-such-bucket-kt: bucket does not exist"


# --- pvc:// and file:// -----------------------------------------------------------------


def test_local_models_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model_dir(tmp_path / "models" / "tiny")
    assert resolve_model(ModelSource(uri=f"file://{model}"), tmp_path / "cache") == model
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    assert resolve_model(ModelSource(uri="pvc://models/tiny"), tmp_path / "cache") == model
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_local_model_missing_or_not_a_model(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    assert model_error(ModelSource(uri=f"file://{missing}"), tmp_path) == (
        f"model not found: file://{missing}"
    )
    (tmp_path / "empty").mkdir()
    assert model_error(ModelSource(uri=f"file://{tmp_path}/empty"), tmp_path) == (
        f"model not found: file://{tmp_path}/empty (no config.json in {tmp_path}/empty)"
    )


def test_revision_only_with_hf(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "tiny")
    source = ModelSource(uri=f"file://{model}", revision="main")
    assert model_error(source, tmp_path) == (
        f"spec.model.revision: only valid with hf:// models, not file://{model}"
    )
