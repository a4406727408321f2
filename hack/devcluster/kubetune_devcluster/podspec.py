"""Pure functions that turn a Pod (as its JSON dict) into what the local node runs,
and a container's process exit into the Pod status the API expects.

Nothing here talks to the API server or starts processes; localnode.py does that.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Pod = dict[str, Any]
Container = dict[str, Any]

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
# FallbackToLogsOnError takes at most this much of the log's end (as kubelet does).
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
GPU_RESOURCE = "nvidia.com/gpu"
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ContainerConfigError(Exception):
    """The pod refers to something that is missing (a secret, a key): kubelet's
    CreateContainerConfigError. Retried until it appears or the pod is deleted."""


# ---- environment ------------------------------------------------------------------------


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, undefined ones are
    left as written, and `$$` is an escaped `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def field_ref_value(pod: Pod, field_path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
    }
    if field_path in simple:
        return simple[field_path] or ""
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        match = re.fullmatch(re.escape(prefix) + r"\['(.+)'\]", field_path)
        if match:
            return (meta.get(source) or {}).get(match.group(1), "")
        if field_path == prefix:
            items = sorted((meta.get(source) or {}).items())
            return "\n".join(f'{k}="{v}"' for k, v in items)
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {field_path!r}")


def _quantity_number(quantity: str) -> float:
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not match:
        raise ContainerConfigError(f"bad quantity {quantity!r}")
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


def resource_field_value(
    container: Container, ref: dict[str, Any], node_allocatable: Mapping[str, str]
) -> str:
    """`resourceFieldRef`: the container's limit (or request), else the node's capacity,
    divided by the divisor and rounded up, as kubelet does."""
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = node_allocatable.get(name)
    if value is None:
        value = "0"
    divisor = _quantity_number(ref.get("divisor") or "1")
    number = _quantity_number(value) / divisor
    return str(int(-(-number // 1)))


def _decoded_secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def _configmap_data(configmap: Mapping[str, Any]) -> dict[str, bytes]:
    data = {k: v.encode() for k, v in (configmap.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (configmap.get("binaryData") or {}).items()})
    return data


def _lookup(
    kind: str,
    objects: Mapping[str, Mapping[str, Any]],
    name: str,
    key: str | None,
    optional: bool,
    namespace: str = "",
) -> bytes | dict[str, bytes] | None:
    obj = objects.get(name)
    if obj is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind} "{name}" not found')
    data = _decoded_secret_data(obj) if kind == "secret" else _configmap_data(obj)
    if key is None:
        return data
    if key not in data:
        if optional:
            return None
        # kubelet's words: "couldn't find key KEY in Secret NAMESPACE/NAME"
        what = {"secret": "Secret", "configmap": "ConfigMap"}[kind]
        raise ContainerConfigError(f"couldn't find key {key} in {what} {namespace}/{name}")
    return data[key]


def build_pod_env(
    pod: Pod,
    container: Container,
    secrets: Mapping[str, Mapping[str, Any]],
    configmaps: Mapping[str, Mapping[str, Any]],
    *,
    base: Mapping[str, str] | None = None,
    node_allocatable: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment: `base` (host PATH and the like), then `envFrom`,
    then `env` (later wins). `secrets`/`configmaps` map names in the pod's namespace to
    the objects' JSON; a missing non-optional one raises ContainerConfigError."""
    env: dict[str, str] = dict(base or {})
    namespace = pod.get("metadata", {}).get("namespace", "")
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref, kind, objects = source["configMapRef"], "configmap", configmaps
        elif "secretRef" in source:
            ref, kind, objects = source["secretRef"], "secret", secrets
        else:
            continue
        data = _lookup(kind, objects, ref["name"], None, bool(ref.get("optional")))
        for key, value in (data or {}).items():  # type: ignore[union-attr]
            if _ENV_NAME.match(prefix + key):
                env[prefix + key] = value.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand_vars(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: bytes | str | None
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = _lookup(
                "secret", secrets, ref["name"], ref["key"], bool(ref.get("optional")), namespace
            )
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = _lookup(
                "configmap",
                configmaps,
                ref["name"],
                ref["key"],
                bool(ref.get("optional")),
                namespace,
            )
        elif "fieldRef" in source:
            value = field_ref_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            value = resource_field_value(
                container, source["resourceFieldRef"], node_allocatable or {}
            )
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is None:  # optional and absent: kubelet leaves the variable unset
            continue
        env[name] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return env


def container_argv(container: Container, env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded. The image is not run, so its entrypoint
    is unknown: a container without `command` cannot run on the local node."""
    command = container.get("command") or []
    if not command:
        raise ContainerConfigError(
            f"container {container['name']!r} has no command: the local node runs "
            "commands on the host and cannot use the image's entrypoint"
        )
    return [expand_vars(part, env) for part in [*command, *(container.get("args") or [])]]


def referenced_objects(pod: Pod) -> tuple[set[str], set[str]]:
    """(secret names, configmap names) the pod's env and volumes refer to."""
    secrets: set[str] = set()
    configmaps: set[str] = set()
    spec = pod.get("spec", {})
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
            if "configMapRef" in source:
                configmaps.add(source["configMapRef"]["name"])
        for var in container.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
            if "configMapKeyRef" in value_from:
                configmaps.add(value_from["configMapKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        if "configMap" in volume:
            configmaps.add(volume["configMap"]["name"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                secrets.add(source["secret"]["name"])
            if "configMap" in source:
                configmaps.add(source["configMap"]["name"])
    return secrets, configmaps


# ---- volumes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeFile:
    data: bytes
    mode: int


def _key_files(
    data: Mapping[str, bytes],
    items: list[dict[str, Any]] | None,
    default_mode: int,
    what: str,
    optional: bool,
) -> dict[str, VolumeFile]:
    if items:
        files = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise ContainerConfigError(f"{what}: key {item['key']!r} not found")
            files[item["path"]] = VolumeFile(data[item["key"]], item.get("mode", default_mode))
        return files
    return {key: VolumeFile(value, default_mode) for key, value in data.items()}


def _object_files(
    kind: str,
    objects: Mapping[str, Mapping[str, Any]],
    name: str,
    source: dict[str, Any],
    default_mode: int,
) -> dict[str, VolumeFile]:
    optional = bool(source.get("optional"))
    data = _lookup(kind, objects, name, None, optional)
    if data is None:
        return {}
    return _key_files(
        data,
        source.get("items"),
        source.get("defaultMode", default_mode),  # type: ignore[arg-type]
        f'{kind} "{name}"',
        optional,
    )


def _downward_files(pod: Pod, source: dict[str, Any], default_mode: int) -> dict[str, VolumeFile]:
    files = {}
    for item in source.get("items") or []:
        if "fieldRef" in item:
            value = field_ref_value(pod, item["fieldRef"]["fieldPath"])
        else:
            raise ContainerConfigError("downwardAPI resourceFieldRef is not supported")
        files[item["path"]] = VolumeFile(value.encode(), item.get("mode", default_mode))
    return files


# The API server issues no token for less than 10 minutes; kubelet renews a projected token
# once 80% of its lifetime has passed.
MIN_TOKEN_SECONDS = 600
TOKEN_RENEW_FRACTION = 0.8


def token_lifetime(requested_seconds: int) -> int:
    return max(MIN_TOKEN_SECONDS, int(requested_seconds))


def token_renew_after(requested_seconds: int) -> float:
    """Seconds after issuing a projected token at which kubelet writes a fresh one."""
    return TOKEN_RENEW_FRACTION * token_lifetime(requested_seconds)


def token_lifetimes(volume: dict[str, Any]) -> list[int]:
    """The requested lifetimes of the service-account tokens a projected volume holds."""
    sources = (volume.get("projected") or {}).get("sources") or []
    return [
        int(source["serviceAccountToken"].get("expirationSeconds", 3600))
        for source in sources
        if "serviceAccountToken" in source
    ]


def volume_files(
    volume: dict[str, Any],
    pod: Pod,
    secrets: Mapping[str, Mapping[str, Any]],
    configmaps: Mapping[str, Mapping[str, Any]],
    token_for: Callable[[str | None, int], str],
) -> dict[str, VolumeFile] | None:
    """The files of a configMap/secret/downwardAPI/projected volume, by relative path;
    None for volumes that are directories (emptyDir, hostPath). `token_for(audience,
    expiration_seconds)` returns a service-account token for projected tokens."""
    if "configMap" in volume:
        src = volume["configMap"]
        return _object_files("configmap", configmaps, src["name"], src, 0o644)
    if "secret" in volume:
        src = volume["secret"]
        return _object_files("secret", secrets, src["secretName"], src, 0o644)
    if "downwardAPI" in volume:
        src = volume["downwardAPI"]
        return _downward_files(pod, src, src.get("defaultMode", 0o644))
    if "projected" in volume:
        projected = volume["projected"]
        default_mode = projected.get("defaultMode", 0o644)
        files: dict[str, VolumeFile] = {}
        for source in projected.get("sources") or []:
            if "configMap" in source:
                src = source["configMap"]
                files.update(_object_files("configmap", configmaps, src["name"], src, default_mode))
            elif "secret" in source:
                src = source["secret"]
                files.update(_object_files("secret", secrets, src["name"], src, default_mode))
            elif "downwardAPI" in source:
                files.update(_downward_files(pod, source["downwardAPI"], default_mode))
            elif "serviceAccountToken" in source:
                src = source["serviceAccountToken"]
                token = token_for(src.get("audience"), src.get("expirationSeconds", 3600))
                files[src["path"]] = VolumeFile(token.encode(), default_mode)
            else:
                raise ContainerConfigError(f"unsupported projected source {sorted(source)}")
        return files
    if "emptyDir" in volume or "hostPath" in volume:
        return None
    kinds = sorted(k for k in volume if k != "name")
    raise ContainerConfigError(
        f"volume {volume['name']!r}: {', '.join(kinds)} volumes are not supported on the "
        "local node (emptyDir, hostPath, configMap, secret, downwardAPI and projected are)"
    )


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def container_mounts(
    container: Container, volume_dirs: Mapping[str, Path], env: Mapping[str, str]
) -> list[Mount]:
    """Bind mounts for the container's volumeMounts, parents before children."""
    mounts = []
    for volume_mount in container.get("volumeMounts") or []:
        name = volume_mount["name"]
        if name not in volume_dirs:
            raise ContainerConfigError(f"volumeMount {name!r} names no volume of the pod")
        source = volume_dirs[name]
        sub_path = volume_mount.get("subPath") or expand_vars(
            volume_mount.get("subPathExpr", ""), env
        )
        if sub_path:
            if sub_path.startswith("/") or ".." in Path(sub_path).parts:
                raise ContainerConfigError(f"invalid subPath {sub_path!r}")
            source = source / sub_path
        mounts.append(Mount(source, volume_mount["mountPath"], bool(volume_mount.get("readOnly"))))
    return sorted(mounts, key=lambda m: len(Path(m.target).parts))


def mount_namespace_argv(mounts: list[Mount], workdir: str, argv: list[str]) -> list[str]:
    """argv that runs `argv` in a private mount namespace with `mounts` bound in place
    and `workdir` as the working directory. `unshare` execs (no fork), so the PID the
    caller gets is the container's main process."""
    lines = [
        "set -e",
        "bind() {",
        '  if [ -d "$1" ]; then mkdir -p "$2"; '
        'elif [ ! -e "$2" ]; then mkdir -p "$(dirname "$2")"; : > "$2"; fi',
        '  mount --bind "$1" "$2"',
        '  if [ "$3" = ro ]; then mount -o remount,bind,ro "$2"; fi',
        "}",
    ]
    for mount in mounts:
        mode = "ro" if mount.read_only else "rw"
        lines.append(f"bind {shlex.quote(str(mount.source))} {shlex.quote(mount.target)} {mode}")
    lines += [f"cd {shlex.quote(workdir)}", 'exec "$@"']
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        "\n".join(lines),
        "kubetune-container",
        *argv,
    ]


def gpu_request(container: Container) -> int:
    resources = container.get("resources") or {}
    value = (
        (resources.get("limits") or {}).get(GPU_RESOURCE)
        or (resources.get("requests") or {}).get(GPU_RESOURCE)
        or 0
    )
    return int(value)


# ---- status -----------------------------------------------------------------------------


def exit_code_from_returncode(returncode: int) -> int:
    """Popen reports death by signal N as -N; a container runtime reports 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(
    container: Container, message_file: bytes, log_tail: bytes, exit_code: int
) -> str:
    """The container's termination message: its message file, or with
    FallbackToLogsOnError and an empty file after a failure, the end of its log."""
    message = message_file[:MAX_TERMINATION_MESSAGE_BYTES]
    policy = container.get("terminationMessagePolicy", "File")
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        message = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode(errors="replace")


def waiting_state(reason: str, message: str | None = None) -> dict[str, Any]:
    waiting: dict[str, Any] = {"reason": reason}
    if message:
        waiting["message"] = message
    return {"waiting": waiting}


def running_state(started_at: str) -> dict[str, Any]:
    return {"running": {"startedAt": started_at}}


def terminated_state(
    exit_code: int,
    started_at: str | None,
    finished_at: str,
    message: str = "",
    container_id: str | None = None,
) -> dict[str, Any]:
    terminated: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": finished_at,
    }
    if exit_code > 128:
        terminated["signal"] = exit_code - 128
    if message:
        terminated["message"] = message
    if container_id:
        terminated["containerID"] = container_id
    return {"terminated": terminated}


def should_restart(restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def restart_backoff(restart_count: int) -> float:
    """Seconds before restart number `restart_count + 1`: kubelet's doubling back-off,
    scaled down (1 s, 2 s, 4 s ... capped at 60 s) because local runs are short."""
    return float(min(60, 2 ** max(0, restart_count)))


def pod_phase(restart_policy: str, states: list[dict[str, Any]], restart_pending: bool) -> str:
    """The phase for the main containers' current states."""
    if (
        any("waiting" in s for s in states)
        and not restart_pending
        and not any("running" in s or "terminated" in s for s in states)
    ):
        return "Pending"
    if restart_pending or any("running" in s or "waiting" in s for s in states):
        return "Running"
    exit_codes = [s["terminated"]["exitCode"] for s in states]
    if all(code == 0 for code in exit_codes):
        return "Succeeded"
    return "Failed"
