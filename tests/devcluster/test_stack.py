"""The install steps the demo and the real-node tests share (kubetune_devcluster.stack):
the chart values for the local images, and the digest check that skips re-imports."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from kubetune_devcluster import stack


def test_chart_values_use_the_local_images_never_pulled() -> None:
    args = stack.ChartValues(
        s3_endpoint="http://10.0.0.1:9000", trainer_cpu="500m", trainer_memory="2Gi"
    ).helm_args()
    values = dict(a.split("=", 1) for a in args if "=" in a)
    operator, trainer = stack.image_ref("operator"), stack.image_ref("trainer")
    assert f"{values['image.repository']}:{values['image.tag']}" == operator
    assert f"{values['trainer.image.repository']}:{values['trainer.image.tag']}" == trainer
    assert values["image.pullPolicy"] == "Never"
    assert values["s3.endpoint"] == "http://10.0.0.1:9000"
    assert (values["trainer.resources.cpu"], values["trainer.resources.memory"]) == ("500m", "2Gi")
    assert values["progress.patchIntervalSeconds"] == "1"
    assert values["trainer.allowedImages[0]"] == "localhost/kubetune/"  # other local images


def oci_archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


def test_archive_digest_is_read_from_the_index_alone(tmp_path: Path) -> None:
    index = {"manifests": [{"digest": "sha256:abc", "mediaType": "x"}]}
    archive = oci_archive(tmp_path / "image.oci.tar", {"index.json": json.dumps(index).encode()})
    assert stack.archive_digest(archive) == "sha256:abc"


def test_an_archive_without_an_index_is_named(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "broken.oci.tar", {"blobs/x": b"x"})
    with pytest.raises(stack.StackError, match=r"broken.oci.tar: no index.json"):
        stack.archive_digest(archive)
