"""The real node's images, kept across dev clusters.

A real node's containerd root lives in its cluster's state dir, so without this every new
cluster imports the 6.8 GB trainer image again (minutes) and writes ~14 GB (the archive's
blobs and the unpacked layers). The store is one containerd root under
`<cache>/node-images/containerd-<version>/root` that holds images and nothing else:

update(archives)        a containerd of the store's own (no kubelet, its sockets in a
                        temporary dir) imports each archive whose image the store lacks,
                        less the blobs it already has (content-addressed, so a rebuilt image
                        costs its new layers; unpacked layers are shared too), drops the
                        image a rebuilt archive replaced, collects its garbage, and records
                        archive -> digest
link_into(node_root)    a new node's containerd root: hard links to the store's content
                        blobs and unpacked layers, which containerd never writes again, and
                        copies of its metadata databases (`*.db`), which it writes in place

Safe when a cluster is lost: no cluster writes the store (removing a cluster unlinks its
own links), an update runs under a lock and records its digests only when complete (a
killed update leaves a store containerd reopens and the next update finishes), and a
store containerd a killed update left running is stopped before the next one starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from kubetune_devcluster import realnode
from kubetune_devcluster.binaries import CONTAINERD_VERSION, cache_dir
from kubetune_devcluster.processes import wait_for

RECORD = "images.json"  # archive path -> digest of its image in the store
GC_TAG = "kubetune.local/image-store/gc:now"  # removed with --sync: a garbage collection now


class ImageStoreError(Exception):
    pass


def store_dir() -> Path:
    # Keyed by containerd's version: the layout of its root is containerd's own.
    return cache_dir() / "node-images" / f"containerd-{CONTAINERD_VERSION}"


def archive_digest(archive: Path) -> str:
    """The manifest digest an OCI archive carries (its index.json; no layer is read)."""
    with tarfile.open(archive) as tar:
        try:
            member = tar.extractfile("index.json")
        except KeyError:
            member = None
        if member is None:
            raise ImageStoreError(
                f"{archive}: no index.json; rebuild it with `bash hack/images.sh`"
            )
        return json.load(member)["manifests"][0]["digest"]


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def recorded(store: Path) -> dict[str, str]:
    """Archive path -> the digest of the image the store holds from it."""
    try:
        return dict(json.loads((store / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _write_record(store: Path, record: dict[str, str]) -> None:
    tmp = store / f"{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(store / RECORD)


def update(archives: Sequence[Path], store: Path | None = None) -> Path:
    """The store holding these archives' images (and those of archives other clusters
    asked for; one image per archive: a rebuilt archive's old image goes); returns the
    store's containerd root."""
    store = store or store_dir()
    wanted = {str(Path(a).resolve()): archive_digest(Path(a)) for a in archives}
    with _locked(store):
        record = recorded(store)
        changed = {a: d for a, d in wanted.items() if record.get(a) != d}
        if not changed:
            return store / "root"
        replaced = {record.pop(a) for a in changed if a in record}
        _write_record(store, record)  # claims nothing it may not finish
        with _store_containerd(store) as paths:
            present = set(realnode.image_digests(paths).values())
            for archive, digest in changed.items():
                if digest not in present:
                    _import_new_blobs(paths, Path(archive), store / "root")
            _forget(paths, replaced - set(record.values()) - set(wanted.values()))
        _write_record(store, record | changed)
    return store / "root"


def link_into(node_root: Path, store: Path | None = None) -> None:
    """A fresh node's containerd root (which must not exist) from the store's."""
    store = store or store_dir()
    source = store / "root"
    if node_root.exists():
        raise ImageStoreError(f"{node_root} exists: a node's root is linked only when new")
    node_root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(store):
        # GNU cp: hard links for the whole tree (the store and the state dir must share a
        # filesystem), then the databases replaced by copies of their own.
        result = subprocess.run(
            ["cp", "-a", "--link", str(source), str(node_root)], capture_output=True, text=True
        )
        if result.returncode != 0:
            shutil.rmtree(node_root, ignore_errors=True)
            raise ImageStoreError(f"linking {source} into {node_root}: {result.stderr.strip()}")
        for db in node_root.glob("*/*.db"):  # meta.db, the snapshotters' metadata.db
            db.unlink()
            shutil.copy2(source / db.relative_to(node_root), db)


def seed(node_root: Path, archives: Sequence[Path]) -> bool:
    """The node's root from the store, updated to `archives` first. False (and why, on
    stderr) when the store cannot serve this node: the caller imports as before."""
    try:
        link_into(node_root, update(archives).parent)
    except (ImageStoreError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"image store not used ({exc}); importing the images instead", file=sys.stderr)
        shutil.rmtree(node_root, ignore_errors=True)
        return False
    return True


# --- the store's own containerd ---------------------------------------------------------


def store_containerd_argv(store: Path, paths: realnode.NodePaths) -> list[str]:
    # Its config file in the store, so its command line names the store (pids_naming).
    return realnode.containerd_argv(paths, root=store / "root", config=store / "config.toml")


@contextlib.contextmanager
def _store_containerd(store: Path) -> Iterator[realnode.NodePaths]:
    """containerd on the store's root, its state and sockets in a short temporary dir."""
    realnode.kill_processes_naming(store)  # a store containerd a killed update left running
    state = Path(tempfile.mkdtemp(prefix="kubetune-image-store-"))
    paths = realnode.NodePaths(state / "node")
    proc = subprocess.Popen(
        store_containerd_argv(store, paths),
        env=realnode.containerd_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or realnode.containerd_ready(paths),
            timeout=60,
            what="the image store's containerd",
        )
        if proc.poll() is not None:
            raise ImageStoreError(f"the image store's containerd exited: {proc.stderr.read()}")
        yield paths
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        realnode.unmount_under(state)
        shutil.rmtree(state, ignore_errors=True)


def _import_new_blobs(paths: realnode.NodePaths, archive: Path, root: Path) -> None:
    """`ctr images import` of the archive less the blobs the store has: ctr reads (and
    hashes) every byte it is given, so a rebuilt image costs its new layers, not 6.8 GB."""
    have = root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    with tempfile.NamedTemporaryFile(dir=root.parent, suffix=".oci.tar") as slim:
        with tarfile.open(archive) as full, tarfile.open(fileobj=slim, mode="w") as out:
            for member in full:  # an uncompressed archive: skipped members are never read
                name = member.name.removeprefix("./")
                if name.startswith("blobs/sha256/") and (have / Path(name).name).is_file():
                    continue
                out.addfile(member, full.extractfile(member) if member.isfile() else None)
        slim.flush()
        realnode.ctr(paths, "images", "import", slim.name, timeout=900)


def _forget(paths: realnode.NodePaths, digests: set[str]) -> None:
    """Remove the images with these digests (an archive's image before its rebuild), then
    collect what no image uses any more (layers a rebuilt image shares stay)."""
    images = realnode.image_digests(paths)
    stale = [name for name, digest in images.items() if digest in digests]
    if not stale:
        return
    realnode.ctr(paths, "images", "rm", *stale)
    kept = next((name for name in images if name not in stale), None)
    if kept is not None:
        realnode.ctr(paths, "images", "tag", "--force", kept, GC_TAG)
        realnode.ctr(paths, "images", "rm", "--sync", GC_TAG, timeout=600)
