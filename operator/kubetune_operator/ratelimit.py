"""A per-source limit on failed progress pushes.

A trainer's pushes are authorized; a source whose pushes keep failing (401) is guessing or
flooding. Each source (the client address, or for a push a follower forwarded, the address
the follower names) has a token bucket of failures: `burst` at once, refilled at `per_s`;
while it is empty the source's pushes get 429 before any token check. A genuine trainer never
fails often enough to notice. The number of sources tracked is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from kubetune_operator.metrics import OperatorMetrics

PROGRESS_PREFIX = "/v1/progress/"
FORWARDED_FOR_HEADER = "X-Kubetune-Forwarded-For"
MAX_SOURCES = 10_000


@dataclass
class Bucket:
    tokens: float
    at: float


class FailureLimiter:
    def __init__(
        self, per_s: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_s = per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, source: str) -> Bucket:
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES:
                # Full buckets carry no information: drop them first, then everything.
                self._buckets = {
                    k: b for k, b in self._buckets.items() if self._level(b, now) < self.burst
                }
                if len(self._buckets) >= MAX_SOURCES:
                    self._buckets.clear()
            bucket = self._buckets[source] = Bucket(self.burst, now)
        bucket.tokens, bucket.at = self._level(bucket, now), now
        return bucket

    def _level(self, bucket: Bucket, now: float) -> float:
        return min(self.burst, bucket.tokens + (now - bucket.at) * self.per_s)

    def allowed(self, source: str) -> bool:
        return self._bucket(source).tokens >= 1

    def failed(self, source: str) -> None:
        bucket = self._bucket(source)
        bucket.tokens = max(0.0, bucket.tokens - 1)


def source_of(request: web.Request) -> str:
    return request.headers.get(FORWARDED_FOR_HEADER) or request.remote or "unknown"


def failure_limit_middleware(limiter: FailureLimiter, metrics: OperatorMetrics) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method != "POST" or not request.path.startswith(PROGRESS_PREFIX):
            return await handler(request)
        source = source_of(request)
        if not limiter.allowed(source):
            metrics.progress_events.labels("throttled").inc()
            return web.json_response(
                {"error": "too many failed pushes from this address"},
                status=429,
                headers={"Retry-After": str(max(1, round(1 / limiter.per_s)))},
            )
        response = await handler(request)
        if response.status == 401:
            limiter.failed(source)
        return response

    return middleware
