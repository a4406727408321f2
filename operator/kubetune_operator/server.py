"""The operator's HTTP server: trainer progress pushes, health and metrics.

    POST /v1/progress/<namespace>/<name>   Authorization: Bearer <the trainer pod's token>
    GET  /healthz   /readyz   /metrics

Serves from a thread and an event loop of its own (`ServerThread`), not the loop that runs
kopf's watches and the reconciles: a flood of pushes (forged tokens, say) is parsed, checked
and refused there, and no reconcile waits behind it. What needs the controller's state crosses
to the controller's loop (loops.py): the pod check and the TokenReview of a token that passed
the signature check, the hand-over of an accepted event, and the health, readiness and metrics
answers (those still come from the loop that reconciles, so a wedged controller fails its
liveness probe as before). A push is accepted only with a token that `authorize` traces to a
trainer pod of that very FineTuneJob; anything else is a 401 and is counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from kubetune.api.contract import ProgressEvent
from kubetune_operator.loops import ControllerLoop
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import describe_error

logger = logging.getLogger("kubetune.operator.server")

T = TypeVar("T")
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
    controller: ControllerLoop | None = None,
) -> web.Application:
    """`unhealthy` says why the process should be restarted (dead watches), else None.
    `ready`, `unhealthy` and the metrics are read on `controller`'s loop when one is given
    (`authorize` and `on_progress` cross to it themselves, as far as they need to)."""

    async def on_controller(fn: Callable[[], T]) -> T:
        return await controller.call(fn) if controller is not None else fn()

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
        problem = await on_controller(unhealthy)
        return web.Response(text=problem, status=503) if problem else web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        if await on_controller(ready):
            return web.Response(text="ok")
        return web.Response(text="starting", status=503)

    async def metrics_page(_: web.Request) -> web.Response:
        body = await on_controller(lambda: generate_latest(metrics.registry))
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
    """Start serving in the running loop (HTTPS with `ssl_context`); returns the runner (to
    stop it) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound


class ServerThread:
    """`app` served from a thread of its own, in an event loop of its own.

    server = ServerThread(app, host, port, ssl_context)
    port = await server.start()   # bound (or the bind's error raised here)
    ...
    await server.stop()           # the app's cleanup done, the thread ended
    """

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "progress-server",
    ) -> None:
        self.app = app
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def start(self) -> int:
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(bound,), name=self.name)
        self._thread.daemon = True  # never what keeps the process from exiting
        self._thread.start()
        return await asyncio.wrap_future(bound)

    async def stop(self) -> None:
        if self._thread is None:
            return
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed already
                loop.call_soon_threadsafe(stop.set)
        await asyncio.wrap_future(self._done)

    def _serve(self, bound: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                runner, port = loop.run_until_complete(
                    start_server(self.app, self.host, self.port, self.ssl_context)
                )
            except BaseException as exc:
                bound.set_exception(exc)
                return
            self._stop = asyncio.Event()
            self.loop = loop
            bound.set_result(port)
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(runner.cleanup())
        finally:
            try:
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._done.set_result(None)
