"""Leader election on a real API server's Lease (the process-node control plane): one leader
at a time, a killed or paused leader replaced, a leader that cannot renew stopping before it
is replaced, a released Lease taken at once, and a replaced leader's writes refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from kubetune.kube import Kube
from kubetune_devcluster.controlplane import DevCluster
from kubetune_operator import handlers
from kubetune_operator.leader import Leadership, LeaseTiming, lease_path, make_identity, url_of

pytestmark = [pytest.mark.cluster]

# Short, so the test takes seconds; the same rules as the defaults (15 / 10 / 2).
FAST = LeaseTiming(lease_duration_s=3, renew_deadline_s=2.0, retry_period_s=1.0)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` holds (polled every 50 ms); fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def candidate(
    kube: Kube, namespace: str, name: str, timing: LeaseTiming = FAST
) -> tuple[Leadership, list[str]]:
    """A candidate whose starts and losses are recorded instead of exiting the test."""
    record: list[str] = []
    leadership = Leadership(
        kube,
        namespace,
        "kubetune-operator",
        make_identity(name, f"http://{name}:8080"),
        timing,
        on_started=lambda: record.append("started"),
        on_lost=lambda: record.append("lost"),
    )
    return leadership, record


def with_kube(cluster: DevCluster, body: Callable[[Kube], Awaitable[None]]) -> None:
    async def main() -> None:
        kube = await Kube.connect(kubeconfig=str(cluster.kubeconfig))
        try:
            await body(kube)
        finally:
            await kube.close()

    asyncio.run(main())


def test_one_leader_and_a_killed_leader_is_replaced_after_its_lease(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    async def body(kube: Kube) -> None:
        a, a_record = candidate(kube, k8s_namespace, "a")
        b, b_record = candidate(kube, k8s_namespace, "b")
        a_task = asyncio.create_task(a.run())
        await until(lambda: a.is_leader, 10, "a leads")
        b_task = asyncio.create_task(b.run())
        # b follows: it learns the leader (and where to forward pushes) and does not lead.
        await until(lambda: b.leader_identity == a.identity, 5, "b sees a")
        assert b.leader_url() == "http://a:8080" and not b.is_leader
        await asyncio.sleep(FAST.lease_duration_s)  # a whole lease: a keeps it by renewing
        assert a.is_leader and not b.is_leader and b_record == []
        lease = await kube.get(lease_path(k8s_namespace, "kubetune-operator"))
        assert lease and lease["spec"]["holderIdentity"] == a.identity

        a_task.cancel()  # a is gone without a word (SIGKILL, or SIGSTOP: its Lease stays)
        killed = time.monotonic()
        await until(lambda: "lost" in a_record, FAST.renew_deadline_s + 1, "a stops")
        stopped_after = time.monotonic() - killed
        assert not b.is_leader, "a stopped acting only after b took over"
        await until(lambda: b.is_leader, FAST.lease_duration_s + 2 * FAST.retry_period_s, "b")
        failover = time.monotonic() - killed
        assert b_record == ["started"]
        assert stopped_after < FAST.renew_deadline_s + 0.6 and stopped_after < failover
        lease = await kube.get(lease_path(k8s_namespace, "kubetune-operator"))
        assert lease and lease["spec"]["holderIdentity"] == b.identity
        b_task.cancel()

    with_kube(k8s_cluster, body)


def test_a_released_lease_is_taken_at_once_and_a_former_leader_cannot_write(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    slow = LeaseTiming(lease_duration_s=30, renew_deadline_s=10.0, retry_period_s=1.0)

    async def body(kube: Kube) -> None:
        a, a_record = candidate(kube, k8s_namespace, "a", slow)
        b, _ = candidate(kube, k8s_namespace, "b", slow)
        a_task = asyncio.create_task(a.run())
        await until(lambda: a.is_leader, 10, "a leads")
        b_task = asyncio.create_task(b.run())
        await until(lambda: b.leader_identity == a.identity, 5, "b sees a")

        # The writes of the operator's client go through this gate.
        handlers.state.leadership = a
        gate = handlers.guarded_writes(lambda method, path: None)
        try:
            gate("POST", "/apis/batch/v1/namespaces/x/jobs")  # the leader may
            a_task.cancel()
            assert await a.release()  # a graceful stop
            with pytest.raises(handlers.NotLeader):
                gate("POST", "/apis/batch/v1/namespaces/x/jobs")
            gate("PUT", lease_path(k8s_namespace, "kubetune-operator"))  # the Lease stays open
        finally:
            handlers.state.leadership = None
        # One retry period, not the 30 s lease.
        took = await until(lambda: b.is_leader, 3 * slow.retry_period_s, "b takes over")
        assert took < slow.lease_duration_s / 5
        assert a_record == ["started"]  # a released it: no loss (a stopping operator exits 0)
        b_task.cancel()

    with_kube(k8s_cluster, body)


def test_the_identity_carries_the_progress_url() -> None:
    identity = make_identity("kubetune-operator-7d9f-x2", "http://10.0.0.7:8080")
    assert identity.startswith("kubetune-operator-7d9f-x2_")
    assert url_of(identity) == "http://10.0.0.7:8080"
    assert url_of(make_identity("h", None)) is None and url_of(None) is None
