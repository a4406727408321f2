"""The progress endpoint over real HTTP: a push goes through only when `authorize` says the
token is this job's (the controller's TokenReview-based check is tested on a real cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

from kubetune.api.contract import ProgressEvent
from kubetune_operator import server
from kubetune_operator.metrics import OperatorMetrics

TOKENS = {("team-a", "tune"): "token-a", ("team-b", "other"): "token-b"}
EVENT = {"event": "step", "time": "2026-01-01T00:00:00Z", "step": 3, "totalSteps": 10}


async def authorize(key: tuple[str, str], token: str) -> bool:
    if token == "unreviewable":
        raise OSError("the API server is away")
    return TOKENS.get(key) == token


def run_with_server(check: Callable[[str, list, OperatorMetrics], Awaitable[None]]) -> None:
    async def main() -> None:
        received: list[tuple[tuple[str, str], ProgressEvent]] = []
        metrics = OperatorMetrics()
        app = server.build_app(
            authorize=authorize,
            on_progress=lambda key, event: received.append((key, event)),
            metrics=metrics,
        )
        runner, port = await server.start_server(app, "127.0.0.1", 0)
        try:
            await check(f"http://127.0.0.1:{port}", received, metrics)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def counted(metrics: OperatorMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("kubetune_progress_events_total", {"result": result})


def test_the_jobs_own_token_is_accepted() -> None:
    async def check(base: str, received: list, metrics: OperatorMetrics) -> None:
        async with aiohttp.ClientSession() as http:
            response = await http.post(
                f"{base}/v1/progress/team-a/tune",
                json=EVENT,
                headers={"Authorization": "Bearer token-a"},
            )
            assert response.status == 202
        assert len(received) == 1
        key, event = received[0]
        assert key == ("team-a", "tune") and event.step == 3 and event.totalSteps == 10
        assert counted(metrics, "accepted") == 1

    run_with_server(check)


def test_missing_wrong_and_other_jobs_tokens_are_rejected_and_counted() -> None:
    async def check(base: str, received: list, metrics: OperatorMetrics) -> None:
        url = f"{base}/v1/progress/team-a/tune"
        attempts = [
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Bearer token-b"},  # valid, but for another job
            {"Authorization": "Basic token-a"},
            {"Authorization": "Bearer "},
        ]
        async with aiohttp.ClientSession() as http:
            for headers in attempts:
                response = await http.post(url, json=EVENT, headers=headers)
                assert response.status == 401, headers
            unknown = await http.post(
                f"{base}/v1/progress/team-a/nosuchjob",
                json=EVENT,
                headers={"Authorization": "Bearer token-a"},
            )
            assert unknown.status == 401
        assert received == []
        assert counted(metrics, "rejected") == len(attempts) + 1

    run_with_server(check)


def test_a_token_that_cannot_be_checked_now_is_a_503_not_a_401() -> None:
    async def check(base: str, received: list, metrics: OperatorMetrics) -> None:
        async with aiohttp.ClientSession() as http:
            response = await http.post(
                f"{base}/v1/progress/team-a/tune",
                json=EVENT,
                headers={"Authorization": "Bearer unreviewable"},
            )
            assert response.status == 503
        assert received == []

    run_with_server(check)


def test_malformed_event_is_a_400_naming_the_field() -> None:
    async def check(base: str, received: list, metrics: OperatorMetrics) -> None:
        async with aiohttp.ClientSession() as http:
            response = await http.post(
                f"{base}/v1/progress/team-a/tune",
                json={"event": "step"},
                headers={"Authorization": "Bearer token-a"},
            )
            assert response.status == 400
            assert (await response.json())["error"].startswith("time:")
        assert received == []
        assert counted(metrics, "invalid") == 1

    run_with_server(check)


def test_health_and_metrics_endpoints() -> None:
    async def check(base: str, received: list, metrics: OperatorMetrics) -> None:
        metrics.status_patches.inc()
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{base}/healthz")).status == 200
            assert (await http.get(f"{base}/readyz")).status == 200
            page = await (await http.get(f"{base}/metrics")).text()
        assert "kubetune_status_patches_total 1.0" in page
        assert "process_resident_memory_bytes" in page

    run_with_server(check)
