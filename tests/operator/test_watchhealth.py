"""The liveness check of the watch streams: events and passed freshness checks are
heartbeats; a quiet watch that missed nothing stays alive, one whose objects changed without
an event dies after the bound, and /healthz says so."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kubetune.kube import Kube, core_path
from kubetune_devcluster.controlplane import DevCluster
from kubetune_operator import server
from kubetune_operator.handlers import describe_dead, own_watches
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.watchhealth import Watch, WatchHealth, missed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def obj(uid: str, version: str) -> dict:
    return {"metadata": {"uid": uid, "resourceVersion": version}}


def test_events_are_heartbeats_and_silence_past_the_bound_is_death() -> None:
    clock = Clock()
    health = WatchHealth([Watch("pods", ["/p"]), Watch("jobs", ["/j"])], 300, clock)
    clock.now += 200
    health.observe("pods", "ADDED", obj("a", "1"))
    clock.now += 150
    assert health.dead() == ["jobs"]  # 350 s without anything; pods heard 150 s ago
    clock.now += 151
    assert health.dead() == ["pods", "jobs"]
    assert describe_dead(health.dead(), 300) == (
        "watch stream(s) pods, jobs delivered nothing for over 300 s"
    )
    assert describe_dead([], 300) is None


def test_missed_names_changed_new_and_silently_deleted_objects() -> None:
    delivered = {"a": "5", "b": "7", "gone": "2"}
    assert missed(delivered, {"a": "5", "b": "7", "gone": "2"}) == []
    assert missed(delivered, {"a": "6", "b": "7", "new": "1"}) == ["a", "gone", "new"]


def test_the_watches_listed_are_the_handlers_own() -> None:
    wide = own_watches(OperatorSettings())
    assert [(w.name, w.list_paths, w.label_selector) for w in wide] == [
        ("finetunejobs", ["/apis/kubetune.io/v1alpha1/finetunejobs"], ""),
        ("jobs", ["/apis/batch/v1/jobs"], "app.kubernetes.io/managed-by=kubetune-operator"),
        ("pods", ["/api/v1/pods"], "app.kubernetes.io/managed-by=kubetune-operator"),
    ]
    narrow = own_watches(OperatorSettings(namespaces=["a", "b"]))
    assert narrow[2].list_paths == ["/api/v1/namespaces/a/pods", "/api/v1/namespaces/b/pods"]


def test_healthz_fails_naming_the_dead_watch() -> None:
    clock = Clock()
    health = WatchHealth([Watch("pods", ["/p"])], 60, clock)
    app = server.build_app(
        authorize=lambda key, token: asyncio.sleep(0, False),
        on_progress=lambda key, event: None,
        metrics=OperatorMetrics(),
        unhealthy=lambda: describe_dead(health.dead(), 60),
    )

    async def probes() -> list[tuple[int, str]]:
        answers = []
        async with TestClient(TestServer(app)) as client:
            for _ in range(2):
                response = await client.get("/healthz")
                answers.append((response.status, await response.text()))
                clock.now += 61
        return answers

    assert asyncio.run(probes()) == [
        (200, "ok"),
        (503, "watch stream(s) pods delivered nothing for over 60 s"),
    ]


@pytest.mark.cluster
def test_freshness_check_against_the_api_server(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    """A quiet watch that delivered every object's version passes the check; one that missed
    a change does not, and dies after the bound."""

    async def body() -> None:
        kube = await Kube.connect(kubeconfig=str(k8s_cluster.kubeconfig))
        try:
            path = core_path("configmaps", k8s_namespace)
            await kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "watched", "namespace": k8s_namespace},
                    "data": {"v": "1"},
                }
            )
            clock = Clock()
            health = WatchHealth([Watch("configmaps", [path])], 300, clock)
            for item in ((await kube.request("GET", path)).body or {})["items"]:
                health.observe("configmaps", None, item)  # as kopf's initial listing
            clock.now += 250
            await health.check(kube, quiet_for_s=100)
            assert health.watches["configmaps"].heartbeat == 1250  # missed nothing: alive
            # A change the watch never delivers.
            await kube.merge_patch(f"{path}/watched", {"data": {"v": "2"}})
            clock.now += 250
            await health.check(kube, quiet_for_s=100)
            assert health.watches["configmaps"].heartbeat == 1250
            clock.now += 51
            assert health.dead() == ["configmaps"]
        finally:
            await kube.close()

    asyncio.run(body())
