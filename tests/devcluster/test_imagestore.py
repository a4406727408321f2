"""The real node's image store kept across dev clusters (kubetune_devcluster.imagestore),
with a real containerd: an archive is imported once, a rebuilt one replaces its image, a
node's root shares the store's blobs and layers but owns its databases, and a store
containerd a killed update left behind does not block the next update. (That the real
stack's node starts with both images from the store: tests/e2e/test_real_node.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kubetune_devcluster import imagestore, realnode
from kubetune_devcluster.binaries import MODULES_DIR, image_program
from kubetune_devcluster.processes import wait_for
from tests.devcluster.test_realnode import real_node_or_skip

pytestmark = pytest.mark.cluster

BLOBS = Path("io.containerd.content.v1.content") / "blobs" / "sha256"
META_DB = Path("io.containerd.metadata.v1.bolt") / "meta.db"


def tiny_archive(path: Path, name: str, note: str) -> Path:
    """An OCI archive of the testbox program and a file whose text makes the digest."""
    note_file = path.with_suffix(".note")
    note_file.write_text(note)
    subprocess.run(
        [
            sys.executable,
            str(MODULES_DIR / "images" / "oci_archive.py"),
            f"--name={name}",
            f"--out={path}",
            f"--file={image_program('testbox')}:/testbox:0755",
            f"--file={note_file}:/note:0644",
            "--entrypoint=/testbox",
        ],
        check=True,
    )
    return path


def store_images(store: Path) -> dict[str, str]:
    """Name -> digest (not CRI's own `sha256:<config>` aliases)."""
    with imagestore._store_containerd(store) as paths:
        images = realnode.image_digests(paths)
    return {name: digest for name, digest in images.items() if not name.startswith("sha256:")}


def blob(root: Path, digest: str) -> Path:
    return root / BLOBS / digest.removeprefix("sha256:")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    real_node_or_skip()
    return tmp_path / "store"


def test_an_archive_is_imported_once_and_a_rebuilt_one_replaces_its_image(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tiny_archive(tmp_path / "app.oci.tar", "localhost/kubetune/app:dev", "one")
    first = imagestore.archive_digest(archive)
    root = imagestore.update([archive], store)
    assert imagestore.recorded(store) == {str(archive.resolve()): first}
    assert store_images(store) == {"localhost/kubetune/app:dev": first}
    assert blob(root, first).is_file()

    def no_containerd(_store: Path) -> None:
        raise AssertionError("an update with nothing new started containerd")

    with monkeypatch.context() as patched:
        patched.setattr(imagestore, "_store_containerd", no_containerd)
        imagestore.update([archive], store)

    tiny_archive(archive, "localhost/kubetune/app:dev", "two")  # rebuilt, same path and name
    second = imagestore.archive_digest(archive)
    assert second != first
    imagestore.update([archive], store)
    assert imagestore.recorded(store) == {str(archive.resolve()): second}
    assert store_images(store) == {"localhost/kubetune/app:dev": second}
    assert not blob(root, first).exists()  # the replaced image's manifest was collected


def test_a_node_root_shares_blobs_and_layers_but_owns_its_databases(
    store: Path, tmp_path: Path
) -> None:
    archive = tiny_archive(tmp_path / "app.oci.tar", "localhost/kubetune/app:dev", "one")
    digest = imagestore.archive_digest(archive)
    store_root = imagestore.update([archive], store)
    node_root = tmp_path / "node" / "containerd" / "root"
    imagestore.link_into(node_root, store)

    assert blob(node_root, digest).stat().st_ino == blob(store_root, digest).stat().st_ino
    layers = list((node_root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots").iterdir())
    assert layers, "the unpacked layers came along"
    for db in (META_DB, Path("io.containerd.snapshotter.v1.overlayfs") / "metadata.db"):
        assert (node_root / db).read_bytes() == (store_root / db).read_bytes()
        assert (node_root / db).stat().st_ino != (store_root / db).stat().st_ino

    with pytest.raises(imagestore.ImageStoreError, match="exists"):
        imagestore.link_into(node_root, store)  # only a new node's root

    # A node whose state dir is removed (a lost cluster) takes nothing from the store.
    subprocess.run(["rm", "-rf", str(tmp_path / "node")], check=True)
    assert blob(store_root, digest).is_file()
    assert store_images(store) == {"localhost/kubetune/app:dev": digest}


def test_a_store_containerd_left_by_a_killed_update_is_stopped_by_the_next(
    store: Path, tmp_path: Path
) -> None:
    archive = tiny_archive(tmp_path / "app.oci.tar", "localhost/kubetune/app:dev", "one")
    imagestore.update([archive], store)
    # What an update killed mid-import leaves: a containerd holding the store's database.
    state = Path(tempfile.mkdtemp(prefix="kubetune-leftover-"))
    paths = realnode.NodePaths(state / "node")
    leftover = subprocess.Popen(
        imagestore.store_containerd_argv(store, paths),
        env=realnode.containerd_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: realnode.containerd_ready(paths), timeout=60, what="leftover containerd")
        tiny_archive(archive, "localhost/kubetune/app:dev", "two")
        imagestore.update([archive], store)
        assert leftover.wait(timeout=30) == -9  # SIGKILLed by the update
        assert store_images(store) == {
            "localhost/kubetune/app:dev": imagestore.archive_digest(archive)
        }
    finally:
        leftover.kill()
        leftover.wait()
        realnode.unmount_under(state)
        shutil.rmtree(state, ignore_errors=True)
