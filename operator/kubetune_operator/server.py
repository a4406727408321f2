"""The operator's HTTP server: trainer progress pushes, health and metrics.

    POST /v1/progress/<namespace>/<name>   Authorization: Bearer <the trainer pod's token>
    GET  /healthz   /readyz   /metrics

Runs in the operator's event loop (started from kopf's startup handler). A push is accepted
only with a token that `authorize` traces to a trainer pod of that very FineTuneJob; anything
else is a 401 and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from kubetune.api.contract import ProgressEvent
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import describe_error

logger = logging.getLogger("kubetune.operator.server")

Key = tuple[str, str]
Authorize = Callable[[Key, str], Awaitable[bool]]
ProgressSink = Callable[[Key, ProgressEvent], None]
MAX_BODY = 64 * 1024
# A progress event is a few hundred bytes: a body still arriving after this long is a client
# holding a connection open, not a trainer.
BODY_TIMEOUT_S = 10.0


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def build_app(
    *,
    authorize: Authorize,
    on_progress: ProgressSink,
    metrics: OperatorMetrics,
    ready: Callable[[], bool] = lambda: True,
    unhealthy: Callable[[], str | None] = lambda: None,
) -> web.Application:
    """`unhealthy` says why the process should be restarted (dead watches), else None."""

    async def progress(request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        presented = bearer_token(request.headers.get("Authorization"))
        try:
            allowed = bool(presented) and await authorize(key, presented)
        except Exception:  # the API server could not review the token: try again later
            logger.warning("could not check a progress token", exc_info=True)
            return web.json_response({"error": "cannot check the token now"}, status=503)
        if not allowed:
            metrics.progress_events.labels("rejected").inc()
            logger.warning(
                "rejected progress push",
                extra={"namespace": key[0], "finetunejob": key[1], "remote": request.remote},
            )
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
        except TimeoutError:
            metrics.progress_events.labels("invalid").inc()
            return web.json_response({"error": "request body too slow"}, status=408)
        except web.HTTPRequestEntityTooLarge:
            metrics.progress_events.labels("invalid").inc()
            return web.json_response({"error": f"body over {MAX_BODY} bytes"}, status=413)
        try:
            event = ProgressEvent.model_validate_json(body)
        except ValidationError as exc:
            metrics.progress_events.labels("invalid").inc()
            message = describe_error(exc, first_only=True, whole="body")
            return web.json_response({"error": message}, status=400)
        metrics.progress_events.labels("accepted").inc()
        on_progress(key, event)
        return web.json_response({"accepted": True}, status=202)

    async def healthz(_: web.Request) -> web.Response:
        problem = unhealthy()
        return web.Response(text=problem, status=503) if problem else web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok") if ready() else web.Response(text="starting", status=503)

    async def metrics_page(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/progress/{namespace}/{name}", progress)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start_server(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start serving (HTTPS with `ssl_context`); returns the runner (to stop it) and the
    bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound
