"""Hostile traffic at the progress endpoint, over real sockets: each is refused and none of
it delays another job's pushes. (Spoofed tokens and another job's token are in test_server.py
here and, through the real TokenReview, in tests/e2e/test_operator_cluster.py.)"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from kubetune_operator import server
from kubetune_operator.controller import progress_allowed
from tests.operator.test_server import EVENT, counted, run_with_server

GOOD = {"Authorization": "Bearer token-a"}
OTHER_JOB = "/v1/progress/team-b/other"


async def push_other_job(base: str, http: aiohttp.ClientSession) -> float:
    """Seconds a legitimate push of another job takes, end to end."""
    started = time.monotonic()
    response = await http.post(
        f"{base}{OTHER_JOB}", json=EVENT, headers={"Authorization": "Bearer token-b"}
    )
    assert response.status == 202
    return time.monotonic() - started


def test_oversized_and_malformed_bodies_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def check(base: str, received: list, metrics) -> None:
        url = f"{base}/v1/progress/team-a/tune"
        async with aiohttp.ClientSession() as http:
            big = await http.post(
                url, data=b"{" + b" " * (server.MAX_BODY + 10) + b"}", headers=GOOD
            )
            assert big.status == 413
            for body in (b"{not json", b"[]", b'{"event": 5}', b"\xff\xfe", b""):
                bad = await http.post(url, data=body, headers=GOOD)
                assert bad.status == 400, body
            assert await push_other_job(base, http) < 5
        assert [key for key, _ in received] == [("team-b", "other")]
        assert counted(metrics, "invalid") == 6

    run_with_server(check)


def test_a_slow_client_is_cut_off_and_delays_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 1.0)

    async def check(base: str, received: list, metrics) -> None:
        host, port = base.removeprefix("http://").split(":")
        # Headers promising 200 bytes, then 10 of them, then nothing: never finished.
        stalled = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/progress/team-a/tune HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer token-a\r\nContent-Type: application/json\r\n"
                b"Content-Length: 200\r\n\r\n" + b'{"event": '
            )
            await writer.drain()
            stalled.append((reader, writer))
        # A client that never finishes even its headers.
        half_reader, half_writer = await asyncio.open_connection(host, int(port))
        half_writer.write(b"POST /v1/progress/team-a/tune HTTP/1.1\r\nHost: x\r\nAuthoriz")
        await half_writer.drain()

        async with aiohttp.ClientSession() as http:
            assert await push_other_job(base, http) < 2  # not queued behind the stalled ones
        for reader, writer in stalled:
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
            assert status_line.startswith(b"HTTP/1.1 408"), status_line
            writer.close()
        half_writer.close()
        assert [key for key, _ in received] == [("team-b", "other")]

    run_with_server(check)


def pod(uid: str, phase: str, job_uid: str) -> dict:
    owner = {"kind": "Job", "uid": job_uid, "controller": True, "name": "tune-trainer"}
    return {"metadata": {"uid": uid, "ownerReferences": [owner]}, "status": {"phase": phase}}


JOB = {
    "metadata": {
        "uid": "job-1",
        "ownerReferences": [{"kind": "FineTuneJob", "uid": "ftj-1", "controller": True}],
    }
}
FTJ = {"metadata": {"uid": "ftj-1"}}


@pytest.mark.parametrize(
    ("token_pod", "the_pod", "job", "ftj", "allowed"),
    [
        ("pod-1", pod("pod-1", "Running", "job-1"), JOB, FTJ, True),
        ("pod-1", pod("pod-1", "Succeeded", "job-1"), JOB, FTJ, False),  # replay after the end
        ("pod-1", pod("pod-1", "Failed", "job-1"), JOB, FTJ, False),
        ("pod-2", pod("pod-1", "Running", "job-1"), JOB, FTJ, False),  # a recreated pod's name
        ("pod-1", pod("pod-1", "Running", "job-9"), JOB, FTJ, False),  # another Job's pod
        ("pod-1", pod("pod-1", "Running", "job-1"), JOB, {"metadata": {"uid": "x"}}, False),
        ("pod-1", pod("pod-1", "Running", "job-1"), None, FTJ, False),
        ("pod-1", pod("pod-1", "Running", "job-1"), JOB, None, False),
    ],
)
def test_progress_is_allowed_only_from_a_running_pod_of_this_job(
    token_pod: str, the_pod: dict, job: dict | None, ftj: dict | None, allowed: bool
) -> None:
    assert progress_allowed(token_pod, the_pod, job, ftj) is allowed
