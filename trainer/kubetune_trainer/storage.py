"""Where inputs come from and artifacts go: s3://, pvc:// and file:// URIs.

S3 credentials and endpoint come only from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION), which the operator fills from
spec.output.credentialsSecretRef. pvc://claim/path is a PersistentVolumeClaim the operator
mounts at $KUBETUNE_PVC_ROOT/claim (default /mnt/pvc/claim); file:// is a plain local path
(for `kubetune run`).

Errors the user must fix (no such bucket, credentials refused, nothing at a URI) become
`BadInputError`; anything else (a network hiccup) propagates so the pod is retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from kubetune.api import uris
from kubetune.api.contract import S3_UNAVAILABLE_PREFIX
from kubetune_trainer.errors import BadInputError

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_PVC_ROOT = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
DEFAULT_REGION = "us-east-1"

# Written next to files synced from S3: key -> size and ETag, so a re-sync skips what is there.
SYNC_INDEX = ".kubetune-sync.json"

_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_REFUSED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "403",
}


class NotFoundError(BadInputError):
    """Nothing at a URI (no object, prefix or path)."""


@dataclass(frozen=True)
class ParsedUri(uris.StorageUri):
    """A storage URI taken apart (kubetune.api.uris), plus where a local one is mounted."""

    @property
    def local_path(self) -> Path:
        """The local path of a file:// or pvc:// URI."""
        if self.scheme == "file":
            return Path(self.key)
        if self.scheme == "pvc":
            root = Path(os.environ.get(ENV_PVC_ROOT) or DEFAULT_PVC_ROOT)
            return root / self.bucket / self.key if self.key else root / self.bucket
        raise ValueError(f"{self.uri}: not a local (file:// or pvc://) URI")


def parse_uri(uri: str) -> ParsedUri:
    """Split `uri` into scheme, bucket (or claim, host, hub org) and key (or path)."""
    try:
        base = uris.parse_uri(uri)
    except uris.UriError as error:
        raise BadInputError(str(error)) from None
    return ParsedUri(base.uri, base.scheme, base.bucket, base.key)


# --- S3 ---------------------------------------------------------------------------------


def s3_client() -> Any:
    """A boto3 S3 client configured only from the environment (read at call time)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    # S3-compatible stores (MinIO, Ceph) behind a custom endpoint rarely do virtual hosts.
    addressing = {"addressing_style": "path"} if endpoint else {}
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3=addressing)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def s3_bad_input(error: Exception, bucket: str) -> BadInputError | None:
    """The user-facing error for an S3 failure the user must fix, else None."""
    if isinstance(error, NoCredentialsError):
        return BadInputError(
            f"s3://{bucket}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if not isinstance(error, ClientError):
        return None
    code = _error_code(error)
    if code in _MISSING_BUCKET_CODES:
        return BadInputError(f"s3://{bucket}: bucket does not exist")
    if code in _REFUSED_CODES:
        return BadInputError(f"s3://{bucket}: credentials refused ({code})")
    return None


@contextlib.contextmanager
def s3_errors(bucket: str) -> Iterator[None]:
    """Turn bucket and credential failures inside the block into BadInputError."""
    try:
        yield
    except (ClientError, NoCredentialsError) as error:
        bad = s3_bad_input(error, bucket)
        if bad is None:
            raise
        raise bad from None


# How long an S3 outage is ridden out (retrying with backoff) before the trainer gives up:
# long enough for an endpoint restart or a network blip, short enough that a dead endpoint
# fails the attempt (it is retried, and resumes from the last complete checkpoint).
ENV_S3_OUTAGE_SECONDS = "KUBETUNE_S3_OUTAGE_SECONDS"
DEFAULT_S3_OUTAGE_SECONDS = 600.0
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown"}


class StorageUnavailableError(Exception):
    """S3 stayed unreachable past the outage bound; the message names the bucket."""


def _transient(error: Exception) -> bool:
    if isinstance(error, ClientError):
        return _error_code(error) in _TRANSIENT_CODES
    return isinstance(error, BotoCoreError) and not isinstance(error, NoCredentialsError)


def outage_bound() -> float:
    return float(os.environ.get(ENV_S3_OUTAGE_SECONDS) or DEFAULT_S3_OUTAGE_SECONDS)


def ride_out_outage(call: Callable[[], T], bucket: str, what: str) -> T:
    """`call()`, retried with exponential backoff (1 s doubling to 30 s) while S3 fails
    transiently, up to the outage bound; then StorageUnavailableError naming the bucket."""
    deadline = time.monotonic() + outage_bound()
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as error:
            if not _transient(error):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                bound = outage_bound()
                raise StorageUnavailableError(
                    f"{S3_UNAVAILABLE_PREFIX}s3://{bucket} did not answer for {bound:.0f} s "
                    f"({what}: {' '.join(str(error).split())[:200]}); checkpoints already "
                    "uploaded are intact"
                ) from None
            log.warning("s3://%s: %s failed (%s); retrying in %.0f s", bucket, what, error, delay)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def list_s3_objects(client: Any, bucket: str, prefix: str) -> list[S3Object]:
    """Every object under `prefix` (directory markers left out), in key order."""
    objects = []
    with s3_errors(bucket):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    objects.append(S3Object(item["Key"], item["Size"], item["ETag"].strip('"')))
    return sorted(objects, key=lambda o: o.key)


def _inside(root: Path, relative: str) -> Path:
    # A key such as "../../etc/x" must not escape the destination.
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BadInputError(f"object key {relative!r} points outside its folder")
    return target


def _download_atomically(client: Any, bucket: str, key: str, target: Path) -> None:
    # Downloaded to a temporary name first, so an interrupted copy never looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    client.download_file(bucket, key, str(partial))
    os.replace(partial, target)


def sync_s3_objects(
    client: Any, bucket: str, objects: list[S3Object], strip_prefix: str, dest_dir: Path
) -> list[Path]:
    """Mirror `objects` into `dest_dir` (keys minus `strip_prefix`): files already there with
    the same size and ETag are kept, files synced earlier whose object is gone are removed.
    Returns the local paths."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    index_path = dest_dir / SYNC_INDEX
    try:
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
    except (OSError, ValueError):
        index = {}
    paths = []
    with s3_errors(bucket):
        for obj in objects:
            relative = obj.key[len(strip_prefix) :].lstrip("/")
            target = _inside(dest_dir, relative)
            known = index.get(relative, {})
            unchanged = (
                target.is_file()
                and target.stat().st_size == obj.size
                and known.get("etag") == obj.etag
            )
            if not unchanged:
                _download_atomically(client, bucket, obj.key, target)
                index[relative] = {"size": obj.size, "etag": obj.etag}
                index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
            paths.append(target)
    # A file synced earlier whose object is gone must not linger (it would be read as data).
    current = {obj.key[len(strip_prefix) :].lstrip("/") for obj in objects}
    for relative in [r for r in index if r not in current]:
        (dest_dir / relative).unlink(missing_ok=True)
        del index[relative]
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
    return paths


def fetch_s3(parsed: ParsedUri, dest_dir: Path) -> Path:
    """Download one object (-> dest_dir/<name>) or everything under a prefix (-> dest_dir)."""
    client = s3_client()
    key = parsed.key
    if key and not key.endswith("/"):
        exact = [o for o in list_s3_objects(client, parsed.bucket, key) if o.key == key]
        if exact:
            name = PurePosixPath(key).name
            parent = key[: -len(name)]
            return sync_s3_objects(client, parsed.bucket, exact, parent, dest_dir)[0]
    prefix = key.rstrip("/") + "/" if key else ""
    objects = list_s3_objects(client, parsed.bucket, prefix)
    if not objects:
        raise NotFoundError(f"{parsed.uri}: not found (no object or prefix with that key)")
    sync_s3_objects(client, parsed.bucket, objects, prefix, dest_dir)
    return dest_dir


def fetch(uri: str, dest_dir: Path) -> Path:
    """A local path holding what `uri` names.

    s3:// objects are downloaded into `dest_dir` (a single object to dest_dir/<name>, a
    prefix's objects beneath dest_dir, skipping files already present with the same size and
    ETag); file:// and pvc:// paths are returned in place. BadInputError when nothing is there.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return fetch_s3(parsed, Path(dest_dir))
    if parsed.scheme in ("file", "pvc"):
        path = parsed.local_path
        if not path.exists():
            raise NotFoundError(f"{uri}: not found ({path} does not exist)")
        return path
    raise BadInputError(f"{uri}: hf:// is not a storage location here (use the model or dataset)")


# --- artifact stores --------------------------------------------------------------------


def _folder(prefix: str) -> str:
    """A key prefix with folder semantics: 'ckpt-1' must not match 'ckpt-10/...'."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


class ArtifactStore(ABC):
    """A place for artifacts, addressed by keys relative to the store's URI."""

    uri: str

    @abstractmethod
    def check_access(self) -> None:
        """Fail early with BadInputError when the location cannot be used."""

    @abstractmethod
    def put_file(self, local: Path, key: str) -> str:
        """Upload one file; returns its URI."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (plain string prefix), sorted."""

    @abstractmethod
    def get_file(self, key: str, local: Path) -> Path:
        """Download one key to `local`; FileNotFoundError when missing."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when missing."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> str:
        """Store `data` under `key`; returns its URI."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_keys(self, keys: list[str]) -> None: ...

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The full URI of `key`."""

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> str:
        return self.write_bytes(key, text.encode("utf-8"))

    def put_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Upload every file under `local_dir` to `prefix/<relative path>`; returns the keys."""
        folder = _folder(prefix)
        keys = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = folder + path.relative_to(local_dir).as_posix()
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, local_dir: Path) -> list[Path]:
        """Download every key under the folder `prefix` into `local_dir`; returns the paths."""
        folder = _folder(prefix)
        paths = []
        for key in self.list_keys(folder):
            paths.append(self.get_file(key, _inside(Path(local_dir), key[len(folder) :])))
        return paths

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the folder `prefix`; returns how many."""
        keys = self.list_keys(_folder(prefix))
        self.delete_keys(keys)
        return len(keys)


class S3Store(ArtifactStore):
    """s3://bucket/prefix/ via boto3."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = _folder(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client = s3_client()

    def _key(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def check_access(self) -> None:
        # list_objects_v2 rather than head_bucket: a HEAD response has no body, so its
        # errors carry no code such as InvalidAccessKeyId.
        with s3_errors(self.bucket):
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def _ride(self, call: Callable[[], T], what: str) -> T:
        return ride_out_outage(call, self.bucket, what)

    def put_file(self, local: Path, key: str) -> str:
        content_type = mimetypes.guess_type(str(local))[0] or "application/octet-stream"
        with s3_errors(self.bucket):
            self._ride(
                lambda: self._client.upload_file(
                    str(local),
                    self.bucket,
                    self._key(key),
                    ExtraArgs={"ContentType": content_type},
                ),
                f"upload of {key}",
            )
        return self.uri_for(key)

    def list_keys(self, prefix: str = "") -> list[str]:
        objects = self._ride(
            lambda: list_s3_objects(self._client, self.bucket, self._key(prefix)), "listing"
        )
        return [o.key[len(self.prefix) :] for o in objects]

    def get_file(self, key: str, local: Path) -> Path:
        with self._missing_as_not_found(key), s3_errors(self.bucket):
            self._ride(
                lambda: _download_atomically(
                    self._client, self.bucket, self._key(key), Path(local)
                ),
                f"download of {key}",
            )
        return Path(local)

    def read_bytes(self, key: str) -> bytes:
        with self._missing_as_not_found(key), s3_errors(self.bucket):
            return self._ride(
                lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key))[
                    "Body"
                ].read(),
                f"read of {key}",
            )

    def write_bytes(self, key: str, data: bytes) -> str:
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        with s3_errors(self.bucket):
            self._ride(
                lambda: self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
                ),
                f"write of {key}",
            )
        return self.uri_for(key)

    def exists(self, key: str) -> bool:
        try:
            with s3_errors(self.bucket):
                self._ride(
                    lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)),
                    f"check of {key}",
                )
        except ClientError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete_keys(self, keys: list[str]) -> None:
        with s3_errors(self.bucket):
            for start in range(0, len(keys), 1000):  # the DeleteObjects limit
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                self._ride(
                    lambda batch=batch: self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": batch}
                    ),
                    "delete",
                )

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextlib.contextmanager
    def _missing_as_not_found(self, key: str) -> Iterator[None]:
        try:
            yield
        except ClientError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self.uri_for(key)) from None
            raise


class LocalStore(ArtifactStore):
    """A directory: file:///path or pvc://claim/path."""

    def __init__(self, uri: str, root: Path, volume: Path | None = None) -> None:
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.root = root
        self._volume = volume  # a pvc:// claim's mount point, which must already exist

    def _path(self, key: str) -> Path:
        return _inside(self.root, key.lstrip("/"))

    def check_access(self) -> None:
        if self._volume is not None and not self._volume.is_dir():
            raise BadInputError(f"{self.uri}: volume not mounted at {self._volume}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadInputError(
                f"{self.uri}: cannot create {self.root} ({error.strerror})"
            ) from None
        if not os.access(self.root, os.W_OK):
            raise BadInputError(f"{self.uri}: {self.root} is not writable")

    def put_file(self, local: Path, key: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return self.uri_for(key)

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix.lstrip("/")))

    def get_file(self, key: str, local: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(self.uri_for(key))
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)
        return Path(local)

    def read_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(self.uri_for(key))
        return source.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return self.uri_for(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        self._prune_empty_dirs()

    def uri_for(self, key: str) -> str:
        return self.uri + key.lstrip("/")

    def _prune_empty_dirs(self) -> None:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def open_store(uri: str) -> ArtifactStore:
    """The artifact store for an output URI (s3://, file:// or pvc://)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return S3Store(parsed.bucket, parsed.key)
    if parsed.scheme == "file":
        return LocalStore(uri, parsed.local_path)
    if parsed.scheme == "pvc":
        volume = parse_uri(f"pvc://{parsed.bucket}").local_path
        return LocalStore(uri, parsed.local_path, volume=volume)
    raise BadInputError(
        f"{uri}: not a place to store artifacts (expected s3://, file:// or pvc://)"
    )
