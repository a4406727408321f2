"""The storage URIs a FineTuneJob names: s3://, hf://, pvc:// and file://.

Pure parsing, shared by the operator (which claims to mount, whether S3 is used), the
trainer (where to read and write) and the command line (where a report is).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("s3", "hf", "pvc", "file")


class UriError(ValueError):
    """A URI that names no place kubetune can use; the message is one line."""


@dataclass(frozen=True)
class StorageUri:
    """A storage URI taken apart.

    s3://bucket/key, pvc://claim/path, hf://org/name (bucket=org, key=name) and
    file:///abs/path (bucket="", key="/abs/path"; file://rel/path is relative).
    """

    uri: str
    scheme: str
    bucket: str
    key: str

    @property
    def repo_id(self) -> str:
        """The Hugging Face repository of an hf:// URI: `org/name` (or `name`)."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def as_prefix(self) -> StorageUri:
        """The same location with its key ending in `/` (a folder of objects)."""
        if not self.key or self.key.endswith("/"):
            return self
        return StorageUri(self.uri + "/", self.scheme, self.bucket, self.key + "/")


def parse_uri(uri: str, *, schemes: tuple[str, ...] = SCHEMES) -> StorageUri:
    """Split `uri` into scheme, bucket (or claim, hub org) and key (or path)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in schemes:
        expected = ", ".join(f"{s}://" for s in schemes)
        raise UriError(f"{uri}: unsupported URI (expected {expected})")
    if scheme == "file":
        # file:///abs/path is absolute; file://rel/path is relative to the working directory.
        return StorageUri(uri, scheme, "", rest)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UriError(f"{uri}: missing {'bucket' if scheme == 's3' else 'name'}")
    if scheme == "hf":
        key = key.strip("/")
    return StorageUri(uri, scheme, bucket, key)
