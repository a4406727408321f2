"""The real node's parts that need no cluster: pinned versions, the OCI archive writer,
the generated containerd, kubelet and CoreDNS configuration."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from kubetune_devcluster import binaries, realnode
from kubetune_devcluster.binaries import (
    CONTAINERD_VERSION,
    K8S_VERSION,
    MODULES_DIR,
    image_ref,
    module_version,
)


def test_module_version_reads_both_spellings_of_a_requirement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "go.mod").write_text(
        "module demo\n\ngo 1.24\n\n"
        "require example.com/single v1.2.3\n\n"
        "require (\n"
        "\texample.com/block/v2extra v9.9.9\n"
        "\texample.com/block/v2 v2.0.1 // indirect\n"
        ")\n"
    )
    monkeypatch.setattr(binaries, "MODULES_DIR", tmp_path)
    assert binaries.module_version("demo", "example.com/single") == "v1.2.3"
    # In a block, and not confused with a module whose path merely starts the same.
    assert binaries.module_version("demo", "example.com/block/v2") == "v2.0.1"
    with pytest.raises(LookupError, match="demo/go.mod: no version of example.com/absent"):
        binaries.module_version("demo", "example.com/absent")


def test_the_pinned_versions_are_releases_of_the_expected_majors() -> None:
    release = re.compile(r"v\d+\.\d+\.\d+")
    assert release.fullmatch(K8S_VERSION) and K8S_VERSION.startswith("v1.")
    assert release.fullmatch(CONTAINERD_VERSION) and CONTAINERD_VERSION.startswith("v2.")
    assert module_version("etcd", "go.etcd.io/etcd/server/v3").startswith("v3.")
    assert module_version("helm", "helm.sh/helm/v3").startswith("v3.")


def test_oci_archive_is_a_valid_single_layer_image(tmp_path: Path) -> None:
    program = tmp_path / "hello"
    program.write_bytes(b"#!/bin/true\n")
    archive = tmp_path / "hello.oci.tar"
    subprocess.run(
        [
            sys.executable,
            str(MODULES_DIR / "images" / "oci_archive.py"),
            "--name=localhost/test/hello:1",
            f"--out={archive}",
            f"--file={program}:/bin/hello:0755",
            "--dir=/tmp:1777",
            "--entrypoint=/bin/hello",
            "--user=65532:65532",
        ],
        check=True,
    )
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    for name, content in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(content).hexdigest() == name.rsplit("/", 1)[1]
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/test/hello:1"
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["config"]["Entrypoint"] == ["/bin/hello"]
    assert config["config"]["User"] == "65532:65532"
    (layer_desc,) = manifest["layers"]
    layer = files[f"blobs/sha256/{layer_desc['digest'].split(':')[1]}"]
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:gz") as rootfs:
        members = {m.name: m for m in rootfs.getmembers()}
    assert members["bin/hello"].mode == 0o755 and members["bin/hello"].uid == 0
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777


def test_containerd_config_keeps_everything_under_the_state_dir(tmp_path: Path) -> None:
    paths = realnode.NodePaths(tmp_path / "node")
    config = tomllib.loads(realnode.containerd_config(paths))
    for key in ("root", "state", "temp"):
        assert config[key].startswith(str(paths.root))
    plugins = config["plugins"]
    assert plugins["io.containerd.server.v1.grpc"]["address"] == str(paths.socket)
    runtime = plugins["io.containerd.cri.v1.runtime"]
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False and runc["Root"] == str(paths.runc_root)
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    assert runtime["cni"]["conf_dir"] == str(paths.cni_conf_dir)
    sandbox = plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"]
    assert sandbox == image_ref("pause")
    assert config["imports"] == []  # nothing from /etc/containerd


def test_kubelet_config_fits_this_machine_and_serves_logs_and_exec(tmp_path: Path) -> None:
    paths = realnode.NodePaths(tmp_path / "node")
    config = realnode.kubelet_config(
        paths,
        port=10250,
        healthz_port=10248,
        max_pods=110,
        ca_file=tmp_path / "ca.crt",
        cert_file=tmp_path / "node.crt",
        key_file=tmp_path / "node.key",
    )
    assert (config["cgroupDriver"], config["failCgroupV1"]) == ("cgroupfs", False)
    assert config["authentication"]["webhook"]["enabled"] is True
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["clusterDNS"] == [realnode.DNS_SERVICE_IP]
    assert config["containerRuntimeEndpoint"] == f"unix://{paths.socket}"
    assert config["podLogsDir"].startswith(str(paths.root))


def test_cni_network_never_masquerades(tmp_path: Path) -> None:
    paths = realnode.NodePaths(tmp_path / "node")
    realnode.write_cni_config(paths)
    (bridge,) = json.loads((paths.cni_conf_dir / "10-kubetune.conflist").read_text())["plugins"]
    assert (bridge["bridge"], bridge["ipMasq"]) == (realnode.BRIDGE, False)
    assert bridge["ipam"]["ranges"] == [
        [{"subnet": realnode.POD_CIDR, "gateway": realnode.GATEWAY}]
    ]
    assert bridge["ipam"]["dataDir"].startswith(str(paths.root))


def test_coredns_answers_the_cluster_domain_and_forwards_nothing() -> None:
    objects = {obj["kind"]: obj for obj in realnode.coredns_objects()}
    corefile = objects["ConfigMap"]["data"]["Corefile"]
    assert f"kubernetes {realnode.CLUSTER_DOMAIN}" in corefile
    assert "forward" not in corefile
    assert objects["Service"]["spec"]["clusterIP"] == realnode.DNS_SERVICE_IP
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image_ref("coredns")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
