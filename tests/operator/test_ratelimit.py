"""The per-source limit on failed progress pushes: a burst of failures, then 429 before any
token check; other sources and successful pushes unaffected; the bucket refills."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from kubetune_operator import server
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.ratelimit import (
    FORWARDED_FOR_HEADER,
    FailureLimiter,
    failure_limit_middleware,
)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failures_drain_a_sources_bucket_which_refills() -> None:
    clock = Clock()
    limiter = FailureLimiter(per_s=2, burst=3, clock=clock)
    for _ in range(3):
        assert limiter.allowed("10.0.0.1")
        limiter.failed("10.0.0.1")
    assert not limiter.allowed("10.0.0.1")
    assert limiter.allowed("10.0.0.2")  # another source has its own bucket
    clock.now += 0.5  # one failure's worth back
    assert limiter.allowed("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert not limiter.allowed("10.0.0.1")


def test_a_flooding_source_gets_429_before_any_token_check() -> None:
    checked: list[str] = []

    async def authorize(key: tuple[str, str], token: str) -> bool:
        checked.append(token)
        return token == "good"

    metrics = OperatorMetrics()
    app = server.build_app(authorize=authorize, on_progress=lambda k, e: None, metrics=metrics)
    app.middlewares.append(failure_limit_middleware(FailureLimiter(1, 5), metrics))

    async def flood() -> list[int]:
        statuses = []
        async with TestClient(TestServer(app)) as client:
            for token in ["forged"] * 8 + ["good"]:
                response = await client.post(
                    "/v1/progress/ns/job", data=b"{}", headers={"Authorization": f"Bearer {token}"}
                )
                statuses.append(response.status)
            # A forwarded push is limited by the address the follower names.
            response = await client.post(
                "/v1/progress/ns/job",
                data=b"{}",
                headers={"Authorization": "Bearer good", FORWARDED_FOR_HEADER: "10.9.9.9"},
            )
            statuses.append(response.status)
        return statuses

    statuses = asyncio.run(flood())
    assert statuses[:5] == [401] * 5 and statuses[5:9] == [429] * 4
    assert statuses[9] != 429  # another origin, not throttled
    assert checked.count("forged") == 5  # the throttled ones were never checked
    assert metrics.progress_events.labels("throttled")._value.get() == 4
