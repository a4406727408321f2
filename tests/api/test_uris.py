"""Storage URIs: one parser for every layer; nothing escapes a bucket prefix or a volume."""

from __future__ import annotations

import pytest

from kubetune.api.uris import StorageUri, UriError, parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.jsonl", StorageUri("s3://bucket/a/b.jsonl", "s3", "bucket", "a/b.jsonl")),
        ("hf://org/name/", StorageUri("hf://org/name/", "hf", "org", "name")),
        ("pvc://claim/dir", StorageUri("pvc://claim/dir", "pvc", "claim", "dir")),
        ("file:///abs/path", StorageUri("file:///abs/path", "file", "", "/abs/path")),
        ("s3://bucket/a..b/c", StorageUri("s3://bucket/a..b/c", "s3", "bucket", "a..b/c")),
    ],
)
def test_parse(uri: str, expected: StorageUri) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://x/y", "ftp://x/y: unsupported URI (expected s3://, hf://, pvc:// or file://)"),
        ("s3:///key", "s3:///key: missing bucket"),
        ("pvc://claim/../other-claim/x", "'..' is not allowed"),
        ("s3://bucket/team-a/../team-b/", "'..' is not allowed"),
        ("file:///data/../etc/passwd", "'..' is not allowed"),
        ("pvc://claim//etc/passwd", "must be relative"),
    ],
)
def test_refused(uri: str, message: str) -> None:
    with pytest.raises(UriError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_uri(uri)


def test_schemes_can_be_narrowed() -> None:
    with pytest.raises(UriError, match=r"expected s3://\)"):
        parse_uri("hf://org/name", schemes=("s3",))


def test_as_prefix_adds_one_slash() -> None:
    assert parse_uri("s3://b/k").as_prefix().key == "k/"
    assert parse_uri("s3://b/k/").as_prefix().key == "k/"
