"""Progress pushes that reach a follower go on to the leader.

The Service spreads trainer pushes over every ready replica; only the leader holds the
caches and writes status, so a follower passes each push, token and body unchanged, to the
URL the leader advertises in its Lease (leader.py) and answers with the leader's answer. The
leader authenticates it as if it came straight from the trainer. A push forwarded once is
never forwarded again (two replicas that each think the other leads, for a moment around a
takeover, answer 503 rather than loop); so is one that arrives while nobody leads. The
trainer does not retry a failed push: its next one carries newer progress anyway.
docs/operator.md says why this rather than a readiness probe that only the leader passes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from kubetune_operator.leader import Leadership
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.ratelimit import FORWARDED_FOR_HEADER, source_of
from kubetune_operator.settings import OperatorSettings

logger = logging.getLogger("kubetune.operator.forwarding")
PROGRESS_PREFIX = "/v1/progress/"
FORWARDED_HEADER = "X-Kubetune-Forwarded-By"
FORWARD_TIMEOUT_S = 10.0
PASSED_HEADERS = ("Authorization", "Content-Type")


def forwarding_middleware(
    leadership: Callable[[], Leadership | None],
    metrics: OperatorMetrics,
    own_url: Callable[[], str],
    settings: OperatorSettings | None = None,
) -> Callable:
    """An aiohttp middleware: progress pushes to a follower are forwarded to the leader.
    With TLS, the leader's certificate is verified against the CA trainers use, for the name
    trainers reach it by (the Service's; it is addressed by pod IP)."""
    session: aiohttp.ClientSession | None = None
    tls: dict = {}
    if settings is not None and (ca := settings.progress_ca_pem):
        tls = {
            "ssl": ssl.create_default_context(cadata=ca),
            "server_hostname": urlsplit(settings.effective_progress_base_url).hostname,
        }

    def unavailable(why: str) -> web.Response:
        metrics.progress_events.labels("unforwarded").inc()
        return web.json_response({"error": why}, status=503)

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        nonlocal session
        election = leadership()
        if (
            election is None
            or election.is_leader
            or request.method != "POST"
            or not request.path.startswith(PROGRESS_PREFIX)
        ):
            return await handler(request)
        target = election.leader_url()
        if request.headers.get(FORWARDED_HEADER) or not target or target == own_url():
            return unavailable("no leader to take the push now; the next push will reach it")
        body = await request.read()  # bounded by the app's client_max_size
        headers = {h: request.headers[h] for h in PASSED_HEADERS if h in request.headers}
        headers[FORWARDED_HEADER] = own_url()
        headers[FORWARDED_FOR_HEADER] = source_of(request)  # the leader limits by the origin
        if session is None:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S), trust_env=False
            )
        try:
            async with session.post(
                target + request.path_qs, data=body, headers=headers, **tls
            ) as got:
                answer = await got.read()
                metrics.progress_events.labels("forwarded").inc()
                return web.Response(
                    body=answer, status=got.status, content_type=got.content_type or None
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("could not forward a progress push to %s: %s", target, exc)
            return unavailable("the leader did not answer; the next push will reach it")

    async def close(_: web.Application) -> None:
        if session is not None:
            await session.close()

    middleware.close = close  # type: ignore[attr-defined]  # registered as on_cleanup
    return middleware
