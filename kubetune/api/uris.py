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


def _expected(schemes: tuple[str, ...]) -> str:
    names = [f"{s}://" for s in schemes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def parse_uri(uri: str, *, schemes: tuple[str, ...] = SCHEMES) -> StorageUri:
    """Split `uri` into scheme, bucket (or claim, hub org) and key (or path).

    A `..` segment is refused everywhere: on a volume it would leave the claim's mount, and
    in S3 it would make one key name two places once someone copies the objects to disk.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in schemes:
        raise UriError(f"{uri}: unsupported URI (expected {_expected(schemes)})")
    if ".." in rest.split("/"):
        raise UriError(f"{uri}: '..' is not allowed in a URI (it would leave its bucket or volume)")
    if scheme == "file":
        # file:///abs/path is absolute; file://rel/path is relative to the working directory.
        return StorageUri(uri, scheme, "", rest)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UriError(f"{uri}: missing {'bucket' if scheme == 's3' else 'name'}")
    if scheme == "pvc" and key.startswith("/"):
        raise UriError(f"{uri}: the path inside claim {bucket} must be relative (no '//')")
    if scheme == "hf":
        key = key.strip("/")
    return StorageUri(uri, scheme, bucket, key)
