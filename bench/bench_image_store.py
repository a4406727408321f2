"""A new real node's images: imported into its own containerd root (the baseline, what every
cluster did before the image store) vs linked from the store kept across clusters, and a
rebuilt trainer image brought into the store. Needs root, the node's binaries and the image
archives (`bash hack/k8s-binaries.sh`, `bash hack/images.sh`).

    .venv/bin/python bench/bench_image_store.py

The baseline imports into a scratch store on the same filesystem (removed afterwards).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from kubetune_devcluster import imagestore, realnode, stack
from kubetune_devcluster.binaries import cache_dir


def timed(action) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def main() -> None:
    archives = realnode.node_image_archives([str(p) for p in stack.image_archives().values()])
    imagestore.update(archives)  # the store itself up to date first (not measured)
    scratch = Path(tempfile.mkdtemp(prefix="bench-image-store-", dir=cache_dir()))
    try:
        baseline = timed(lambda: imagestore.update(archives, scratch / "store"))
        linked = timed(lambda: imagestore.link_into(scratch / "node" / "root"))
        unchanged = timed(lambda: imagestore.update(archives))
    finally:
        realnode.unmount_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"images: {', '.join(a.name for a in archives)}")
    print(f"baseline, import into a new node's own root: {baseline:.1f} s")
    print(f"kubetune, link a new node's root from the store: {linked:.1f} s")
    print(f"kubetune, store update with nothing new: {unchanged:.2f} s")


if __name__ == "__main__":
    main()
