"""Write a single-layer OCI image archive (what `podman save --format oci-archive`
writes) from files on disk, with the standard library only: the dev node's own images
are built FROM scratch on this machine, nothing is pulled.

    python3 oci_archive.py --name localhost/kubetune/pause:1 --out pause.tar \
        --file /path/to/pause:/pause:0755 --entrypoint /pause --user 65535:65535

The archive is reproducible: fixed timestamps, root-owned files, sorted entries.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(files: list[tuple[Path, str, int]], dirs: list[tuple[str, int]]) -> bytes:
    """An uncompressed layer: the given directories, then each (source, path, mode)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, mode in sorted(dirs):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        for source, path, mode in sorted(files, key=lambda f: f[1]):
            data = source.read_bytes()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def blob(content: bytes, media_type: str) -> tuple[dict, bytes]:
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(content)}, content


def image_archive(
    name: str,
    files: list[tuple[Path, str, int]],
    dirs: list[tuple[str, int]],
    entrypoint: list[str],
    user: str,
    env: list[str],
) -> bytes:
    raw_layer = layer_tar(files, dirs)
    layer_desc, layer = blob(gzip.compress(raw_layer, mtime=0), OCI_LAYER)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "Env": env, "WorkingDir": "/"},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(raw_layer).hexdigest()],
        },
        "history": [{"created_by": "kubetune hack/k8s-binaries/images/oci_archive.py"}],
    }
    config_desc, config_bytes = blob(json.dumps(config, sort_keys=True).encode(), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc, manifest_bytes = blob(
        json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST
    )
    # Both names: containerd reads io.containerd.image.name, other tools the OCI ref name.
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name,
    }
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    entries = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for desc, content in (
        (layer_desc, layer),
        (config_desc, config_bytes),
        (manifest_desc, manifest_bytes),
    ):
        entries["blobs/sha256/" + desc["digest"].split(":", 1)[1]] = content
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path in sorted(entries):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(entries[path]), 0o644
            tar.addfile(info, io.BytesIO(entries[path]))
    return out.getvalue()


def parse_file(spec: str) -> tuple[Path, str, int]:
    source, path, mode = spec.rsplit(":", 2)
    return Path(source), path, int(mode, 8)


def parse_dir(spec: str) -> tuple[str, int]:
    path, mode = spec.rsplit(":", 1)
    return path, int(mode, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="image reference, e.g. localhost/x:1")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--file", action="append", default=[], help="SOURCE:PATH:MODE (octal)")
    parser.add_argument("--dir", action="append", default=[], help="PATH:MODE (octal)")
    parser.add_argument("--entrypoint", action="append", default=[])
    parser.add_argument("--user", default="0:0")
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args()
    archive = image_archive(
        args.name,
        [parse_file(spec) for spec in args.file],
        [parse_dir(spec) for spec in args.dir],
        args.entrypoint,
        args.user,
        args.env,
    )
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(archive)
    tmp.replace(args.out)  # never a half-written archive under the final name


if __name__ == "__main__":
    main()
