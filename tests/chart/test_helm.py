"""The Helm chart: lint, rendered objects, and (marker `cluster`) a real install.

Rendering tests run `helm template` and assert on the parsed objects: the RBAC verbs are the
operator's and nothing more, the Deployment passes Pod Security "restricted", the env vars
are the operator's settings. Cluster tests install the chart into the local control plane
and ask the API server itself (`kubectl auth can-i`, server-side dry runs, Pod Security
admission).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import crd
from kubetune_devcluster.binaries import K8S_VERSION, find_binary, search_dirs
from tests.fixtures.ftj import push

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
RELEASE = "kt"
RELEASE_NAMESPACE = "kubetune-system"
FULLNAME = "kt-kubetune"
LEADER_ELECTION_ROLE = f"{FULLNAME}-leader-election"
SERVICE_ACCOUNT = FULLNAME

# What the operator does to each namespaced resource: the API calls in
# operator/kubetune_operator/controller.py (get, create, merge_patch, delete) plus kopf's
# list/watch of FineTuneJobs, Jobs and pods; `get` comes with every `list` (it reveals nothing
# more). A change here is a change to what the operator is allowed to do;
# test_operator_runs_under_the_charts_rbac proves it is enough.
NAMESPACED_VERBS: dict[tuple[str, str], set[str]] = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch"},
    ("", "events"): {"create"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "services"): {"create"},
    ("networking.k8s.io", "networkpolicies"): {"create"},
}
# In both modes, cluster-scoped: TokenReviews, to check the trainers' progress tokens.
TOKEN_REVIEW_VERBS: dict[tuple[str, str], set[str]] = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
}
# Cluster-wide, kopf follows CRDs (to notice the FineTuneJob resource come and go); it never
# lists namespaces then, as it watches each resource across all of them. With listed
# namespaces the operator turns kopf's scanning off and needs no other cluster-scoped right.
CLUSTER_ONLY_VERBS: dict[tuple[str, str], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    **TOKEN_REVIEW_VERBS,
}


# ---- binaries --------------------------------------------------------------------------------


def require_binary(name: str) -> Path:
    """The binary the cluster fixture uses too; skip when absent unless the run requires it."""
    path = find_binary(name)
    if path is None:
        where = ", ".join(str(d) for d in search_dirs())
        message = f"{name} not found in {where} (bash hack/k8s-binaries.sh builds it)"
        if os.environ.get("KUBETUNE_REQUIRE_CLUSTER"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return require_binary("helm")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A private HOME-like config so nothing from a user's helm setup leaks in.
    result = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, env=_helm_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _helm_env() -> dict[str, str]:
    base = Path(os.environ.get("TMPDIR", "/tmp")) / "kubetune-helm-home"
    env = dict(os.environ)
    for var, sub in (
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ):
        env[var] = str(base / sub)
    return env


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict]:
    values_file = tmp_path / f"values-{uuid.uuid4().hex[:8]}.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    out = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--kube-version",
        K8S_VERSION,
        "-f",
        str(values_file),
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def rule_map(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    """RBAC rules as {(apiGroup, resource): verbs}, merging rules that repeat a resource."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def restricted_violations(pod: dict) -> list[str]:
    """Pod Security Standard "restricted" (v1.36) checks that apply to this pod spec."""
    problems: list[str] = []
    pod_ctx = pod.get("securityContext") or {}
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces")
    for volume in pod.get("volumes") or []:
        allowed = {
            "name",
            "configMap",
            "secret",
            "emptyDir",
            "projected",
            "downwardAPI",
            "persistentVolumeClaim",
            "ephemeral",
            "csi",
        }
        if set(volume) - allowed:
            problems.append(f"volume {volume['name']}: type not allowed")
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = container.get("securityContext") or {}
        name = container["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as UID 0")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{name}: hostPort")
    return problems


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


NAMESPACED_VALUES = {"watchNamespaces": ["team-a", "team-b"]}


@pytest.fixture(scope="module")
def default_objects(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return render(helm, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def namespaced_objects(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return render(helm, tmp_path_factory.mktemp("helm"), NAMESPACED_VALUES)


# ---- the CRD ---------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    generated = crd.render_crd()
    chart_copy = CHART / "crds" / crd.CRD_PATH.name
    assert crd.CRD_PATH.read_text() == generated, "crds/ is stale: run hack/sync-crd.sh"
    assert chart_copy.read_text() == generated, "the chart's CRD is stale: run hack/sync-crd.sh"


# ---- lint and schema -------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, NAMESPACED_VALUES], ids=["default", "namespaced"])
def test_helm_lint_strict(helm: Path, tmp_path: Path, values: dict) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"progress": {"port": 0}}, "/progress/port"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"uriPolicy": {"allowedSchemes": ["ftp"]}}, "/uriPolicy/allowedSchemes/0"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"trainer": {"resources": {"memory": "lots"}}}, "/trainer/resources/memory"),
        (
            {"trainer": {"tolerations": [{"key": "gpu", "effect": "Never"}]}},
            "/trainer/tolerations/0/effect",
        ),
        ({"trainer": {"nodeSelector": {"gpu": True}}}, "/trainer/nodeSelector/gpu"),
        ({"s3": {"credentialsSecret": "My_Secret"}}, "/s3/credentialsSecret"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(
    helm: Path, tmp_path: Path, values: dict, fragment: str
) -> None:
    with pytest.raises(AssertionError, match="helm template") as failure:
        render(helm, tmp_path, values)
    assert fragment in str(failure.value)


# ---- the Kubernetes version check ------------------------------------------------------------


def test_helm_template_renders_offline_without_a_kube_version(
    helm: Path, default_objects: list[dict]
) -> None:
    # helm's built-in default version is old; with no cluster there is nothing to check, so
    # the whole chart renders (the same objects as for the pinned version), even when the
    # minimum is one no cluster meets.
    expected = sorted((o["kind"], o["metadata"]["name"]) for o in default_objects)
    for extra in ([], ["--set", "compatibility.minKubeVersion=99.0.0"]):
        out = run_helm(
            helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *extra
        ).stdout
        rendered = [doc for doc in yaml.safe_load_all(out) if doc]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == expected, extra


@pytest.mark.cluster
def test_install_checks_the_clusters_version(installed: dict, helm: Path) -> None:
    def dry_run(minimum: str) -> subprocess.CompletedProcess[str]:
        return run_helm(
            helm,
            "install",
            f"version-{uuid.uuid4().hex[:6]}",
            str(CHART),
            "--kubeconfig",
            str(installed["kubeconfig"]),
            "--namespace",
            installed["ns"]["other"],
            "--dry-run=server",
            "--set",
            f"compatibility.minKubeVersion={minimum}",
            check=False,
        )

    refused = dry_run("99.0.0")
    assert refused.returncode != 0
    assert "kubetune needs Kubernetes 99.0.0 or newer; this cluster runs v1.36" in refused.stderr
    accepted = dry_run("1.30.0-0")
    assert accepted.returncode == 0, accepted.stderr


# ---- RBAC ------------------------------------------------------------------------------------


def operator_cluster_roles(objects: list[dict]) -> list[dict]:
    """The ClusterRoles of the operator itself: not those aggregated to the users' roles."""
    return [
        role
        for role in by_kind(objects, "ClusterRole")
        if not any(
            k.startswith("rbac.authorization.k8s.io/aggregate-to-")
            for k in role["metadata"]["labels"]
        )
    ]


def served_roles(objects: list[dict], kind: str) -> list[dict]:
    """The Roles or RoleBindings of the served namespaces (not the leader's Lease's)."""
    return [o for o in by_kind(objects, kind) if o["metadata"]["name"] != LEADER_ELECTION_ROLE]


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(default_objects: list[dict]) -> None:
    assert not served_roles(default_objects, "Role")
    assert not served_roles(default_objects, "RoleBinding")
    (role,) = operator_cluster_roles(default_objects)
    assert rule_map(role["rules"]) == {**NAMESPACED_VERBS, **CLUSTER_ONLY_VERBS}
    binding = one(default_objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": RELEASE_NAMESPACE}
    ]


def test_namespaced_rbac_is_limited_to_the_listed_namespaces(
    namespaced_objects: list[dict],
) -> None:
    roles = served_roles(namespaced_objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_map(role["rules"]) == NAMESPACED_VERBS
    bindings = served_roles(namespaced_objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    # Outside the namespaces only TokenReviews: kopf's cluster scanning is off in this mode.
    (cluster_role,) = operator_cluster_roles(namespaced_objects)
    assert rule_map(cluster_role["rules"]) == TOKEN_REVIEW_VERBS
    (cluster_binding,) = by_kind(namespaced_objects, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert cluster_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": RELEASE_NAMESPACE}
    ]


def test_no_mode_grants_anything_on_secrets_or_configmaps(
    default_objects: list[dict], namespaced_objects: list[dict]
) -> None:
    for obj in default_objects + namespaced_objects:
        if (
            obj["kind"] in ("Role", "ClusterRole")
            and obj["metadata"]["name"] != LEADER_ELECTION_ROLE
        ):
            granted = rule_map(obj["rules"])
            assert not [r for r in granted if r[1] in ("secrets", "configmaps")], obj["metadata"]


def test_rbac_has_no_wildcards(default_objects: list[dict], namespaced_objects: list[dict]) -> None:
    for obj in default_objects + namespaced_objects:
        for rule in obj.get("rules", []):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (obj["metadata"]["name"], rule)


# ---- the operator Deployment -----------------------------------------------------------------


def test_deployment_runs_two_elected_replicas_with_rolling_updates(
    default_objects: list[dict], helm: Path, tmp_path: Path
) -> None:
    from kubetune_operator.settings import OperatorSettings

    deployment = one(default_objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    settings = OperatorSettings.from_env(operator_env(default_objects))
    assert settings.leader_election and settings.lease_name == FULLNAME
    assert settings.lease_namespace == RELEASE_NAMESPACE
    (container,) = pod_spec(default_objects)["containers"]
    pod_ip = {e["name"]: e.get("valueFrom") for e in container["env"]}["POD_IP"]
    assert pod_ip == {"fieldRef": {"fieldPath": "status.podIP"}}  # followers forward there
    # Without the election: one replica, never two at once.
    alone = render(helm, tmp_path, {"leaderElection": {"enabled": False}})
    assert one(alone, "Deployment")["spec"]["replicas"] == 1
    assert one(alone, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not by_kind(alone, "PodDisruptionBudget")
    assert not [r for r in by_kind(alone, "Role") if "leases" in str(r["rules"])]
    assert OperatorSettings.from_env(operator_env(alone)).leader_election is False
    spec = pod_spec(default_objects)
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    (container,) = spec["containers"]
    assert container["command"] == ["kubetune-operator"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def service_selector(objects: list[dict]) -> dict:
    return one(objects, "Service")["spec"]["selector"]


def test_a_disruption_budget_keeps_one_operator_through_drains(default_objects: list[dict]) -> None:
    pdb = one(default_objects, "PodDisruptionBudget")
    assert pdb["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pod_labels = one(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(pdb["spec"]["selector"], pod_labels)


def test_lease_rbac_is_that_one_lease_and_create(
    default_objects: list[dict], namespaced_objects: list[dict]
) -> None:
    for objects in (default_objects, namespaced_objects):
        (role,) = [
            r for r in by_kind(objects, "Role") if r["metadata"]["name"] == LEADER_ELECTION_ROLE
        ]
        assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
        assert role["rules"] == [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [FULLNAME],
                "verbs": ["get", "update"],
            },
            # create cannot name the object (it does not exist yet)
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        ]
        (binding,) = [
            b
            for b in by_kind(objects, "RoleBinding")
            if b["metadata"]["name"] == LEADER_ELECTION_ROLE
        ]
        assert binding["roleRef"]["name"] == LEADER_ELECTION_ROLE
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": RELEASE_NAMESPACE}
        ]
        # No other rule anywhere touches Leases.
        others = [
            o
            for o in by_kind(objects, "Role") + by_kind(objects, "ClusterRole")
            if o is not role and "leases" in json.dumps(o["rules"])
        ]
        assert others == []


def test_probes_hit_the_operators_health_endpoints(default_objects: list[dict]) -> None:
    from kubetune_operator.settings import OperatorSettings

    (container,) = pod_spec(default_objects)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"progress": OperatorSettings().listen_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "progress"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "progress"}
    # The paths are the routes the operator's server has.
    server = (ROOT / "operator" / "kubetune_operator" / "server.py").read_text()
    assert 'add_get("/healthz"' in server and 'add_get("/readyz"' in server


def test_read_only_root_with_writable_tmp(default_objects: list[dict]) -> None:
    spec = pod_spec(default_objects)
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("values", [{}, NAMESPACED_VALUES], ids=["default", "namespaced"])
def test_pod_meets_restricted_pod_security(helm: Path, tmp_path: Path, values: dict) -> None:
    assert restricted_violations(pod_spec(render(helm, tmp_path, values))) == []


def test_restricted_check_catches_a_weakened_security_context(helm: Path, tmp_path: Path) -> None:
    weakened = {
        "securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["NET_RAW"]}}
    }
    problems = restricted_violations(pod_spec(render(helm, tmp_path, weakened)))
    assert "operator: allowPrivilegeEscalation must be false" in problems
    assert "operator: capabilities must drop ALL" in problems


def operator_env(objects: list[dict]) -> dict[str, str]:
    (container,) = pod_spec(objects)["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
FULL_VALUES = {
    "watchNamespaces": ["team-a"],
    "trainer": {
        "image": {"repository": "registry.local/trainer", "tag": "v9"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [GPU_TAINT],
        "nodeLostTolerationSeconds": 30,
        "readOnlyRootFilesystem": False,
        "graceSeconds": 90,
        "checkpointMiBPerSecond": 50,
        "workDirSize": "200Gi",
    },
    "s3": {
        "endpoint": "http://minio.minio.svc:9000",
        "region": "eu-west-1",
        "credentialsSecret": "team-s3",
    },
    "uriPolicy": {"allowedSchemes": ["s3", "pvc"], "allowedS3Prefixes": ["s3://team-a/"]},
    "progress": {"port": 9090, "patchIntervalSeconds": 2.5, "tls": {"secretName": "kt-tls"}},
    "logFormat": "text",
}


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "all-set"])
def test_env_is_the_operators_settings(helm: Path, tmp_path: Path, values: dict) -> None:
    from kubetune_operator.settings import ENV_PREFIX, OperatorSettings

    env = operator_env(render(helm, tmp_path, values))
    known = {ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    assert unknown == [], f"the chart sets variables the operator does not read: {unknown}"
    settings = OperatorSettings.from_env(env)  # the operator accepts every value
    port = values.get("progress", {}).get("port", 8080)
    assert settings.listen_port == port
    scheme = "https" if values else "http"  # all-set: TLS from a Secret
    assert settings.effective_progress_base_url == (
        f"{scheme}://{FULLNAME}-progress.{RELEASE_NAMESPACE}.svc:{port}"
    )
    if values:
        assert settings.namespaces == ["team-a"]
        assert settings.trainer_image == "registry.local/trainer:v9"
        assert settings.s3_endpoint == "http://minio.minio.svc:9000"
        assert settings.allowed_schemes == ["s3", "pvc"]
        assert settings.allowed_s3_prefixes == ["s3://team-a/"]
        assert settings.patch_interval_s == 2.5
        assert settings.log_format == "text"
        assert settings.tls_dir == "/etc/kubetune/tls"
        objects = render(helm, tmp_path, values)
        (container,) = pod_spec(objects)["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": settings.tls_dir, "readOnly": True}
        volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "tls")
        assert volume == {"name": "tls", "secret": {"secretName": "kt-tls"}}
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["scheme"] == "HTTPS"
        assert settings.default_node_selector == {"nvidia.com/gpu.present": "true"}
        assert [t.manifest() for t in settings.default_tolerations] == [GPU_TAINT]
        assert settings.s3_region == "eu-west-1"
        assert settings.default_credentials_secret == "team-s3"
        assert settings.trainer_read_only_root is False
        assert (settings.trainer_grace_seconds, settings.checkpoint_mib_per_s) == (90, 50)
    else:
        assert settings.namespaces == []
        assert settings.trainer_image.endswith(":0.1.0")
        assert settings.default_node_selector == {} and settings.default_tolerations == []
        assert settings.s3_region is None and settings.default_credentials_secret is None
        assert settings.trainer_read_only_root is True


# Settings the chart deliberately leaves at the operator's defaults: the command is the
# image's own program, the server listens on all addresses in its pod, the trainer's default
# requests and user come from trainer.resources / trainer.runAsUser... listed here so a new
# setting is a decision (expose it in values.yaml, or add it here).
NOT_IN_CHART = {"trainer_command", "listen_host", "api_threads", "peer_url"}


def test_every_operator_setting_is_a_chart_value_or_deliberately_not(
    helm: Path, tmp_path: Path
) -> None:
    from kubetune_operator.settings import ENV_PREFIX, OperatorSettings

    env = operator_env(render(helm, tmp_path, FULL_VALUES))
    in_chart = {name.removeprefix(ENV_PREFIX).lower() for name in env}
    assert in_chart | NOT_IN_CHART == set(OperatorSettings.model_fields)
    assert not in_chart & NOT_IN_CHART


def trainer_job(objects: list[dict], **spec: Any) -> dict:
    """The Job the operator, configured by this rendering of the chart, makes for a job."""
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_operator import builders
    from kubetune_operator.settings import OperatorSettings

    settings = OperatorSettings.from_env(operator_env(objects))
    body = {
        "model": {"uri": "s3://models/tiny/"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs/"},
        **spec,
    }
    ftj = FineTuneJob.model_validate(
        {"metadata": {"name": "tune", "namespace": "team-a", "uid": "uid-1"}, "spec": body}
    )
    return builders.build_job(ftj, settings)


def test_trainer_pods_report_progress_to_the_charts_service(helm: Path, tmp_path: Path) -> None:
    for values, port in (({}, 8080), ({"progress": {"port": 9090}}, 9090)):
        objects = render(helm, tmp_path, values)
        service = one(objects, "Service")
        assert service["spec"]["ports"][0]["port"] == port
        container = trainer_job(objects)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
        assert env["KUBETUNE_PROGRESS_URL"] == f"http://{host}:{port}/v1/progress/team-a/tune"


def test_chart_defaults_reach_the_trainer_pod(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, tmp_path, FULL_VALUES)
    pod = trainer_job(objects)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    lost_node = [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    ]
    assert pod["tolerations"] == [GPU_TAINT, *lost_node]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    env = {e["name"]: e for e in container["env"] if "value" in e}  # the chart's values
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"]["name"] == "team-s3"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    # A job's own placement wins over the chart's defaults.
    own = trainer_job(objects, nodeSelector={"pool": "a100"})["spec"]["template"]["spec"]
    assert own["nodeSelector"] == {"pool": "a100"}
    # By default the trainer's root filesystem is read-only.
    default_pod = trainer_job(render(helm, tmp_path))["spec"]["template"]["spec"]
    assert default_pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # A pod leaves a lost node after 60 s by default, not Kubernetes's 300 s.
    assert {t["tolerationSeconds"] for t in default_pod["tolerations"]} == {60}
    # null: no toleration of the operator's; the API server adds Kubernetes's default.
    never = render(helm, tmp_path, {"trainer": {"nodeLostTolerationSeconds": None}})
    assert "tolerations" not in trainer_job(never)["spec"]["template"]["spec"]


# ---- Service and NetworkPolicy ---------------------------------------------------------------


def test_service_routes_to_the_operator(default_objects: list[dict]) -> None:
    service = one(default_objects, "Service")
    pod_labels = one(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "progress"
    assert one(default_objects, "NetworkPolicy")  # on by default


def test_network_policy_admits_only_trainer_pods(helm: Path, tmp_path: Path) -> None:
    from kubetune_operator import names

    objects = render(helm, tmp_path, {"networkPolicy": {"enabled": True}})
    policy = one(objects, "NetworkPolicy")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(policy["spec"]["podSelector"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (ingress,) = policy["spec"]["ingress"]
    peer, replicas = ingress["from"]
    # The other replicas: a follower forwards progress pushes to the leader.
    assert replicas == {"podSelector": {"matchLabels": service_selector(objects)}}
    # The labels of the pods the operator's Job template makes (the Job controller adds its
    # own, which the selector ignores).
    trainer_pod = trainer_job(objects)["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(peer["podSelector"], trainer_pod)
    for other in ({}, {"app": "web"}, {names.LABEL_MANAGED_BY: "someone-else"}):
        assert not selector_matches(peer["podSelector"], other)
    assert peer["namespaceSelector"] == {}  # cluster-wide: trainers in any namespace
    assert ingress["ports"] == [{"port": "progress", "protocol": "TCP"}]


def test_network_policy_in_namespaced_mode_admits_only_the_served_namespaces(
    helm: Path, tmp_path: Path
) -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    values = {
        **NAMESPACED_VALUES,
        "networkPolicy": {"enabled": True, "extraFrom": [prometheus]},
    }
    (ingress,) = one(render(helm, tmp_path, values), "NetworkPolicy")["spec"]["ingress"]
    trainers, _replicas, extra = ingress["from"]
    for namespace, admitted in (("team-a", True), ("team-b", True), ("other", False)):
        labels = {"kubernetes.io/metadata.name": namespace}
        assert selector_matches(trainers["namespaceSelector"], labels) is admitted
    assert extra == prometheus


# ---- on a real API server --------------------------------------------------------------------


def _kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    kubectl = require_binary("kubectl")
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _create_namespace(kubeconfig: Path, name: str, labels: dict[str, str] | None = None) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }
    result = _kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(manifest))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def installed(k8s_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two releases: one cluster-wide, one limited to a namespace. Their pods are kept off
    the node (an unmatched nodeSelector): these tests are about what the API server admits."""
    helm_bin = require_binary("helm")
    kubeconfig = Path(k8s_cluster.kubeconfig)
    suffix = uuid.uuid4().hex[:6]
    ns = {
        "wide": f"kt-wide-{suffix}",
        "narrow": f"kt-narrow-{suffix}",
        "team": f"team-{suffix}",
        "other": f"other-{suffix}",
    }
    for name in ns.values():
        _create_namespace(kubeconfig, name)
    parked = {"nodeSelector": {"kubetune.io/test": "never-scheduled"}}
    releases = {
        "wide": (f"wide-{suffix}", parked),
        "narrow": (f"narrow-{suffix}", {**parked, "watchNamespaces": [ns["team"]]}),
    }
    values_dir = tmp_path_factory.mktemp("install")
    for key, (release, values) in releases.items():
        values_file = values_dir / f"{key}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        run_helm(
            helm_bin,
            "install",
            release,
            str(CHART),
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            ns[key],
            "-f",
            str(values_file),
        )
    yield {
        "kubeconfig": kubeconfig,
        "ns": ns,
        "sa": {
            key: f"system:serviceaccount:{ns[key]}:{rel}-kubetune"
            for key, (rel, _) in releases.items()
        },
    }
    for key, (release, _) in releases.items():
        run_helm(
            helm_bin,
            "uninstall",
            release,
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            ns[key],
            check=False,
        )
    for name in ns.values():
        _kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


def can_i(installed: dict, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    """`kubectl auth can-i` as a ServiceAccount; `resource` may name a subresource
    (`pods/log`), which can-i takes as --subresource."""
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, "--as", installed["sa"][who]]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    result = _kubectl(installed["kubeconfig"], *args)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def _resource_arg(group: str, resource: str) -> str:
    plural, _, sub = resource.partition("/")
    name = f"{plural}.{group}" if group else plural
    return f"{name}/{sub}" if sub else name


@pytest.mark.cluster
def test_installed_service_accounts_can_do_what_the_operator_does(installed: dict) -> None:
    team = installed["ns"]["team"]
    missing = [
        f"{who} {verb} {_resource_arg(group, resource)}"
        for who in ("wide", "narrow")
        for (group, resource), verbs in NAMESPACED_VERBS.items()
        for verb in sorted(verbs)
        if not can_i(installed, who, verb, _resource_arg(group, resource), team)
    ]
    assert missing == []
    for verb in ("get", "list", "watch"):
        assert can_i(
            installed, "wide", verb, "customresourcedefinitions.apiextensions.k8s.io", None
        )
    for who in ("wide", "narrow"):
        assert can_i(installed, who, "create", "tokenreviews.authentication.k8s.io", None)


@pytest.mark.cluster
def test_installed_lease_rbac_is_exactly_the_operators_lease(installed: dict) -> None:
    release_ns, team = installed["ns"]["wide"], installed["ns"]["team"]
    lease = installed["sa"]["wide"].rsplit(":", 1)[1]  # the Lease is named like the release

    def may(verb: str, resource: str, namespace: str) -> bool:
        kind, _, name = resource.partition("/")  # `leases/NAME`: that one object
        target = f"{kind}.coordination.k8s.io" + (f"/{name}" if name else "")
        args = ["auth", "can-i", verb, target, "--as", installed["sa"]["wide"], "-n", namespace]
        answer = _kubectl(installed["kubeconfig"], *args).stdout.strip()
        assert answer in ("yes", "no"), answer
        return answer == "yes"

    assert may("get", f"leases/{lease}", release_ns) and may(
        "update", f"leases/{lease}", release_ns
    )
    assert may("create", "leases", release_ns)
    assert not may("get", "leases/kube-controller-manager", release_ns)
    assert not may("update", "leases/another-operator", release_ns)
    for verb in ("list", "watch", "patch", "delete"):
        assert not may(verb, f"leases/{lease}", release_ns), verb
    for verb in ("get", "update", "create"):
        assert not may(verb, f"leases/{lease}", team), verb
        assert not may(verb, f"leases/{lease}", "kube-system"), verb


ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# What the operator must never be able to do, in any namespace it serves: read or write any
# Secret or ConfigMap, start or enter pods, mint tokens, or write a FineTuneJob other than its
# status (no finalizers: it needs none).
DENIED: list[tuple[str, str]] = [
    *((verb, "secrets") for verb in ALL_VERBS),
    *((verb, "configmaps") for verb in ALL_VERBS),
    *((verb, "pods") for verb in ("create", "update", "patch", "delete", "deletecollection")),
    ("create", "pods/exec"),
    ("get", "pods/exec"),
    ("create", "pods/attach"),
    ("create", "pods/portforward"),
    ("create", "pods/eviction"),
    ("create", "serviceaccounts/token"),
    *((verb, "finetunejobs.kubetune.io") for verb in ALL_VERBS[3:]),
    ("update", "finetunejobs.kubetune.io/status"),
    ("update", "finetunejobs.kubetune.io/finalizers"),
    ("patch", "finetunejobs.kubetune.io/finalizers"),
]


@pytest.mark.cluster
@pytest.mark.parametrize("who", ["wide", "narrow"])
def test_installed_service_accounts_get_no_secrets_pods_or_spec_writes(
    installed: dict, who: str
) -> None:
    namespaces = [installed["ns"]["team"], installed["ns"]["other"]]
    allowed = [
        f"{verb} {resource} in {namespace}"
        for namespace in namespaces
        for verb, resource in DENIED
        if can_i(installed, who, verb, resource, namespace)
    ]
    allowed += [
        f"{verb} {resource} cluster-wide"
        for verb, resource in DENIED
        if resource.split("/")[0] in ("secrets", "configmaps")
        and can_i(installed, who, verb, resource, None)
    ]
    assert allowed == []


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("who", "verb", "resource", "where"),
    [
        ("wide", "delete", "nodes", None),
        ("wide", "create", "pods", "team"),
        ("wide", "delete", "finetunejobs.kubetune.io", "team"),
        ("wide", "create", "clusterroles.rbac.authorization.k8s.io", None),
        ("wide", "update", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("wide", "create", "pods/exec", "team"),
        ("narrow", "get", "secrets", "other"),
        ("wide", "list", "secrets", "team"),
        ("wide", "watch", "secrets", "team"),
        ("wide", "patch", "finetunejobs.kubetune.io", "team"),
        ("wide", "get", "pods/log", "team"),
        ("narrow", "create", "jobs.batch", "other"),
        ("narrow", "list", "finetunejobs.kubetune.io", "other"),
        ("narrow", "patch", "finetunejobs.kubetune.io/status", "other"),
        ("narrow", "get", "pods/log", "other"),
        ("narrow", "list", "namespaces", None),
        ("narrow", "delete", "nodes", None),
        ("wide", "list", "namespaces", None),
        ("narrow", "list", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("wide", "get", "configmaps", "team"),
        ("wide", "update", "jobs.batch", "team"),
    ],
)
def test_installed_service_accounts_are_denied_the_rest(
    installed: dict, who: str, verb: str, resource: str, where: str | None
) -> None:
    namespace = installed["ns"][where] if where else None
    assert not can_i(installed, who, verb, resource, namespace)


def service_account_kubeconfig(installed: dict, who: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the release's ServiceAccount (a real token)."""
    _, _, namespace, name = installed["sa"][who].split(":")
    token = _kubectl(
        installed["kubeconfig"], "create", "token", name, "-n", namespace, "--duration=1h"
    )
    assert token.returncode == 0, token.stderr
    config = yaml.safe_load(Path(installed["kubeconfig"]).read_text())
    for user in config["users"]:
        user["user"] = {"token": token.stdout.strip()}
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return path


def pod_token(api: Any, pod: dict, audience: str) -> str:
    """A token bound to `pod`, as the kubelet requests it for a projected volume."""
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience],
            "expirationSeconds": 600,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
    return api.post(path, request)["status"]["token"]


def rbac_probe_job(name: str) -> dict:
    """A FineTuneJob whose pod never runs (no node matches), to drive the operator's calls."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/runs/", "credentialsSecretRef": {"name": f"{name}-s3"}},
            "resources": {"gpus": 0, "cpu": "100m", "memory": "64Mi"},
            "nodeSelector": {"kubetune.io/test": "never-scheduled"},
        },
    }


# What the operator logs when the API server refuses it something.
PERMISSION_ERRORS = ("Forbidden", "HTTP 403", "Not enough permissions", "reconcile failed")


@pytest.mark.cluster
@pytest.mark.parametrize("who", ["narrow", "wide"])
def test_operator_runs_under_the_charts_rbac(
    installed: dict, k8s_cluster: Any, who: str, tmp_path: Path
) -> None:
    """The operator, authenticated as the chart's ServiceAccount, makes every call of a job's
    life (its Lease, Job, status, Event, pod watch, the signing keys and a progress token's
    review, suspend, delete) without one refusal; namespaced, it needs only TokenReviews
    outside its namespaces and ignores other namespaces."""
    from kubetune_devcluster.processes import wait_for
    from kubetune_devcluster.rest import MERGE
    from tests.fixtures.operator import OperatorProcess

    team, other = installed["ns"]["team"], installed["ns"]["other"]
    namespace = team if who == "narrow" else other
    api = k8s_cluster.rest()
    ftj_path = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs"
    name = f"rbac-{who}"
    # Elected as the chart runs it: the Lease named like the release, in its namespace.
    election = ["--leader-election", "true", "--lease-namespace", installed["ns"][who]]
    election += ["--lease-name", installed["sa"][who].rsplit(":", 1)[1]]
    operator = OperatorProcess(
        k8s_cluster,
        tmp_path,
        trainer_command=["true"],
        extra_args=election + (["--namespace", team] if who == "narrow" else []),
        env={"KUBECONFIG": str(service_account_kubeconfig(installed, who, tmp_path / "kc"))},
    )

    def status() -> dict:
        return api.get(f"{ftj_path}/{name}").get("status") or {}

    def wait_status(what: str, check: Any) -> dict:
        try:
            return wait_for(lambda: check(status()), timeout=60, interval=0.3, what=what)
        except TimeoutError:
            raise AssertionError(f"{what}: {status()}\n{operator.logs()[-3000:]}") from None

    outsider = None
    if who == "narrow":  # a job the namespaced operator must not touch
        outsider = f"/apis/kubetune.io/v1alpha1/namespaces/{other}/finetunejobs"
        api.post(outsider, rbac_probe_job("outsider"))
    operator.start()
    try:
        api.post(ftj_path, rbac_probe_job(name))
        # Unschedulable comes from the pod the Job made: the operator watches pods.
        wait_status("Unschedulable", lambda st: st.get("reason") == "Unschedulable")
        # A progress push with the pod's own token: the operator reviews it (TokenReview).
        (pod,) = api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
        token = pod_token(api, pod, "kubetune.io/progress")
        url = f"{operator.url}/v1/progress/{namespace}/{name}"
        event = b'{"event": "step", "time": "2026-01-01T00:00:00Z", "step": 1, "totalSteps": 10}'
        assert push(url, token, event) == 202
        assert operator.metric("kubetune_token_reviews_total") == 1
        assert "became the leader" in operator.logs()
        job_path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer"
        api.patch(f"{ftj_path}/{name}", {"spec": {"suspend": True}}, MERGE)
        wait_for(
            lambda: api.get(job_path)["spec"].get("suspend") is True,
            timeout=60,
            what="Job suspended by the operator",
        )
        events = api.get(
            f"/api/v1/namespaces/{namespace}/events", fieldSelector=f"involvedObject.name={name}"
        )["items"]
        assert any(e.get("reportingComponent") == "kubetune-operator" for e in events)
        if outsider:
            assert not api.get(f"{outsider}/outsider").get("status")
        logs = operator.logs()
        refused = [line for line in logs.splitlines() if any(e in line for e in PERMISSION_ERRORS)]
        assert refused == [], "\n".join(refused[:5])
    finally:
        operator.stop()
        api.delete(f"{ftj_path}/{name}")
        if outsider:
            api.delete(f"{outsider}/outsider")


@pytest.mark.cluster
def test_operator_pod_is_admitted_under_restricted_pod_security(
    installed: dict, helm: Path, tmp_path: Path
) -> None:
    kubeconfig = installed["kubeconfig"]
    namespace = f"restricted-{uuid.uuid4().hex[:6]}"
    _create_namespace(kubeconfig, namespace, {"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        template = one(render(helm, tmp_path), "Deployment")["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "operator", "namespace": namespace},
            "spec": template["spec"],
        }
        pod["spec"]["serviceAccountName"] = "default"
        admitted = _kubectl(
            kubeconfig, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod)
        )
        assert admitted.returncode == 0, admitted.stderr
        # The namespace does enforce: the same pod, escalating privileges, is refused.
        pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
        refused = _kubectl(
            kubeconfig, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod)
        )
        assert refused.returncode != 0 and "allowPrivilegeEscalation" in refused.stderr
    finally:
        _kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD_MANIFESTS = sorted((ROOT / "tests" / "bad_manifests").glob("*.yaml"))


def expected_fragment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.removeprefix("# expect:").strip()
    raise AssertionError(f"{path.name}: no '# expect:' comment")


@pytest.mark.parametrize("path", BAD_MANIFESTS, ids=lambda p: p.stem)
def test_bad_manifest_is_rejected_locally_naming_the_field(path: Path) -> None:
    from kubetune_trainer.config import load_job
    from kubetune_trainer.errors import BadInputError

    with pytest.raises(BadInputError) as error:
        load_job(path)
    assert expected_fragment(path) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if "kind: FineTuneJob" in p.read_text()], ids=lambda p: p.stem
)
def test_example_is_valid_for_the_local_loader(path: Path) -> None:
    from kubetune_trainer.config import load_job

    job = load_job(path)
    assert job.metadata.name


@pytest.mark.cluster
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted_by_the_api_server(installed: dict, path: Path) -> None:
    # The CRD came with the chart (helm installs crds/ before anything else).
    result = _kubectl(installed["kubeconfig"], "apply", "--dry-run=server", "-f", str(path))
    assert result.returncode == 0, result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("path", BAD_MANIFESTS, ids=lambda p: p.stem)
def test_bad_manifest_is_rejected_by_the_api_server(installed: dict, path: Path) -> None:
    result = _kubectl(installed["kubeconfig"], "apply", "--dry-run=server", "-f", str(path))
    assert result.returncode != 0, f"{path.name} was accepted"
    assert expected_fragment(path) in result.stderr
