"""Storage URIs and artifact stores, against a real S3 API (moto's server) and real folders."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer.errors import BadInputError
from kubetune_trainer.storage import (
    SYNC_INDEX,
    ArtifactStore,
    LocalStore,
    NotFoundError,
    ParsedUri,
    S3Store,
    fetch,
    open_store,
    parse_uri,
)
from tests.fixtures.s3 import S3Server


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "key"),
    [
        ("s3://bucket/models/llama/", "s3", "bucket", "models/llama/"),
        ("s3://bucket", "s3", "bucket", ""),
        ("pvc://claim/data/train.jsonl", "pvc", "claim", "data/train.jsonl"),
        ("file:///abs/train.jsonl", "file", "", "/abs/train.jsonl"),
        ("file://rel/train.jsonl", "file", "", "rel/train.jsonl"),
        ("hf://org/name", "hf", "org", "name"),
    ],
)
def test_parse_uri(uri: str, scheme: str, bucket: str, key: str) -> None:
    assert parse_uri(uri) == ParsedUri(uri, scheme, bucket, key)


def test_local_paths_and_repo_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_PVC_ROOT", raising=False)
    assert parse_uri("pvc://claim/data/x.jsonl").local_path == Path("/mnt/pvc/claim/data/x.jsonl")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/vols")
    assert parse_uri("pvc://claim").local_path == Path("/vols/claim")
    assert parse_uri("file:///abs/x").local_path == Path("/abs/x")
    assert parse_uri("hf://org/name").repo_id == "org/name"
    assert parse_uri("hf://gpt2").repo_id == "gpt2"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "gs://bucket/x",
            "gs://bucket/x: unsupported URI (expected s3://, hf://, pvc:// or file://)",
        ),
        ("/plain/path", "/plain/path: unsupported URI (expected s3://, hf://, pvc:// or file://)"),
        ("s3:///key", "s3:///key: missing bucket"),
    ],
)
def test_parse_uri_rejects(uri: str, message: str) -> None:
    with pytest.raises(BadInputError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        parse_uri(uri)


# --- fetch ------------------------------------------------------------------------------


def put(s3_server: S3Server, bucket: str, key: str, body: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)


def test_fetch_s3_object(s3_env: str, s3_server: S3Server, tmp_path: Path) -> None:
    put(s3_server, s3_env, "data/train.jsonl", b'{"text": "hi"}\n')
    path = fetch(f"s3://{s3_env}/data/train.jsonl", tmp_path)
    assert path == tmp_path / "train.jsonl"
    assert path.read_bytes() == b'{"text": "hi"}\n'


def test_fetch_s3_prefix_skips_unchanged_files(
    s3_env: str, s3_server: S3Server, tmp_path: Path
) -> None:
    put(s3_server, s3_env, "model/config.json", b"{}")
    put(s3_server, s3_env, "model/sub/weights.bin", b"0123456789")
    put(s3_server, s3_env, "model-other/x", b"not part of model/")
    dest = tmp_path / "cache"
    assert fetch(f"s3://{s3_env}/model/", dest) == dest
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [SYNC_INDEX, "config.json", "sub/weights.bin"]

    # Same size and ETag: not downloaded again, so a local edit of the same size survives.
    (dest / "sub/weights.bin").write_bytes(b"ABCDEFGHIJ")
    fetch(f"s3://{s3_env}/model", dest)
    assert (dest / "sub/weights.bin").read_bytes() == b"ABCDEFGHIJ"

    # A changed object (new ETag, same size) is downloaded again.
    put(s3_server, s3_env, "model/sub/weights.bin", b"9876543210")
    fetch(f"s3://{s3_env}/model", dest)
    assert (dest / "sub/weights.bin").read_bytes() == b"9876543210"

    # An object deleted remotely disappears from the mirror; unrelated local files stay.
    (dest / "local-note.txt").write_text("mine")
    s3_server.client().delete_object(Bucket=s3_env, Key="model/sub/weights.bin")
    fetch(f"s3://{s3_env}/model", dest)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [SYNC_INDEX, "config.json", "local-note.txt"]


def test_fetch_missing_key(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as caught:
        fetch(f"s3://{s3_env}/nothing/here", tmp_path)
    assert str(caught.value) == (
        f"s3://{s3_env}/nothing/here: not found (no object or prefix with that key)"
    )


def test_fetch_missing_bucket(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as caught:
        fetch("s3://no-such-bucket-kt/data.jsonl", tmp_path)
    assert str(caught.value) == "s3://no-such-bucket-kt: bucket does not exist"


def test_fetch_local_paths_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert fetch(f"file://{data}", tmp_path / "unused") == data
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "claim").mkdir()
    assert fetch("pvc://claim", tmp_path / "unused") == tmp_path / "claim"
    with pytest.raises(NotFoundError) as caught:
        fetch("pvc://claim/missing.jsonl", tmp_path)
    assert str(caught.value) == (
        f"pvc://claim/missing.jsonl: not found ({tmp_path}/claim/missing.jsonl does not exist)"
    )


# --- access checks ----------------------------------------------------------------------


def test_check_access_missing_bucket(s3_env: str) -> None:
    open_store(f"s3://{s3_env}/runs/").check_access()  # the fresh bucket is fine
    with pytest.raises(BadInputError) as caught:
        open_store("s3://no-such-bucket-kt/runs/").check_access()
    assert str(caught.value) == "s3://no-such-bucket-kt: bucket does not exist"


@pytest.fixture
def s3_auth(s3_server: S3Server, s3_env: str) -> Callable[[], tuple[str, str]]:
    """Turns on credential checks on the server; returns a factory of valid IAM keys."""
    iam = s3_server.iam_client()

    def valid_keys() -> tuple[str, str]:
        user = f"u-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user,
            PolicyName="s3",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    keys = valid_keys()
    s3_server.require_auth(True)
    try:
        yield lambda: keys
    finally:
        s3_server.require_auth(False)


def test_check_access_credentials(
    s3_env: str, s3_auth: Callable[[], tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, secret = s3_auth()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    open_store(f"s3://{s3_env}/runs/").check_access()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    with pytest.raises(BadInputError) as caught:
        open_store(f"s3://{s3_env}/runs/").check_access()
    assert str(caught.value) == f"s3://{s3_env}: credentials refused (InvalidAccessKeyId)"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(BadInputError) as caught:
        open_store(f"s3://{s3_env}/runs/").check_access()
    assert str(caught.value) == f"s3://{s3_env}: credentials refused (SignatureDoesNotMatch)"


def test_check_access_without_credentials(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(BadInputError) as caught:
        open_store(f"s3://{s3_env}/runs/").check_access()
    assert str(caught.value) == (
        f"s3://{s3_env}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    )


def test_pvc_store_needs_a_mounted_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    store = open_store("pvc://results/runs/")
    with pytest.raises(BadInputError) as caught:
        store.check_access()
    assert str(caught.value) == f"pvc://results/runs/: volume not mounted at {tmp_path}/results"
    (tmp_path / "results").mkdir()
    store.check_access()
    assert (tmp_path / "results" / "runs").is_dir()


def test_file_store_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BadInputError) as caught:
        open_store(f"file://{tmp_path}/a-file/out").check_access()
    assert str(caught.value) == (
        f"file://{tmp_path}/a-file/out/: cannot create {tmp_path}/a-file/out (Not a directory)"
    )


# --- artifact stores (S3 and a folder behave the same) ----------------------------------


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_env")
        store = open_store(f"s3://{bucket}/runs/ml/demo")
        assert isinstance(store, S3Store)
    else:
        store = open_store(f"file://{tmp_path}/out/ml/demo")
        assert isinstance(store, LocalStore)
    store.check_access()
    return store


def test_store_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("manifest.json")
    uri = store.write_text("manifest.json", '{"ok": true}')
    assert uri == store.uri_for("manifest.json")
    assert uri.endswith("/ml/demo/manifest.json")
    assert store.exists("manifest.json")
    assert store.read_text("manifest.json") == '{"ok": true}'

    local = tmp_path / "report.md"
    local.write_text("# report")
    store.put_file(local, "eval/report.md")
    assert store.read_text("eval/report.md") == "# report"

    with pytest.raises(FileNotFoundError):
        store.read_text("missing.json")


def test_store_dirs_and_prefixes(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "nested" / "weights.safetensors").write_bytes(b"\x00\x01")
    keys = store.put_dir(src, "checkpoint-1")
    assert keys == ["checkpoint-1/adapter_config.json", "checkpoint-1/nested/weights.safetensors"]
    store.put_dir(src, "checkpoint-10/")

    assert store.list_keys("checkpoint-1/") == keys
    assert len(store.list_keys("checkpoint-1")) == 4  # a plain string prefix
    assert len(store.list_keys()) == 4

    got = store.get_dir("checkpoint-10", tmp_path / "restored")
    assert sorted(p.relative_to(tmp_path / "restored").as_posix() for p in got) == [
        "adapter_config.json",
        "nested/weights.safetensors",
    ]
    assert (tmp_path / "restored" / "nested" / "weights.safetensors").read_bytes() == b"\x00\x01"

    # Folder semantics: deleting checkpoint-1 leaves checkpoint-10 alone.
    assert store.delete_prefix("checkpoint-1") == 2
    assert store.list_keys() == [
        "checkpoint-10/adapter_config.json",
        "checkpoint-10/nested/weights.safetensors",
    ]


def test_store_keys_cannot_escape(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/out")
    with pytest.raises(BadInputError, match="points outside its folder"):
        store.write_text("../../escape.txt", "x")
    assert not (tmp_path / "escape.txt").exists()
