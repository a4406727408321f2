"""Calls from the progress server's thread into the controller's event loop.

The progress server (server.py) runs on a thread and an event loop of its own, so that a flood
of pushes never queues ahead of a reconcile. What it needs of the controller crosses over
here: `ControllerLoop.call`/`run` run a function or a coroutine function on the controller's
loop and await the answer from the server's; `post` hands something over without waiting.
`KubeOnLoop` is the API client seen the same way: its requests run where the client lives.
Calls made for progress pushes are `limited`: at most `in_flight` of them are queued on or
running in the controller's loop at once, however many pushes arrive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kubetune.kube import Kube, Response

T = TypeVar("T")
# Calls for progress pushes (TokenReviews, signing-key reads, pod checks) waiting on the
# controller's loop at once: a flood of pushes adds at most this many entries to that loop's
# queue, and leaves the API client's other connections to the reconciles.
PROGRESS_CALLS_IN_FLIGHT = 8


class ControllerLoop:
    """The controller's event loop, from any thread. Called from that very loop (a server
    run in it, as some tests do), `call` and `run` simply call."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, in_flight: int = PROGRESS_CALLS_IN_FLIGHT
    ) -> None:
        self.loop = loop
        self.in_flight = in_flight
        # The calling loop's (the server's): asyncio primitives belong to one loop.
        self._slots: asyncio.Semaphore | None = None

    def here(self) -> bool:
        """Whether the caller runs in the controller's loop itself."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    async def call(self, fn: Callable[..., T], *args: Any, limited: bool = False) -> T:
        """`fn(*args)` on the controller's loop; its result or exception here."""
        if self.here():
            return fn(*args)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up meanwhile
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller's to handle
                future.set_exception(exc)

        async with self._slot(limited):
            self.loop.call_soon_threadsafe(run)
            return await asyncio.wrap_future(future)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, limited: bool = False) -> T:
        """`await fn(*args)` on the controller's loop; its result or exception here."""
        if self.here():
            return await fn(*args)
        async with self._slot(limited):
            future = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)  # type: ignore[arg-type]
            return await asyncio.wrap_future(future)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """`fn(*args)` on the controller's loop, soon, in the order posted; not waited for."""
        self.loop.call_soon_threadsafe(fn, *args)

    def _slot(self, limited: bool) -> contextlib.AbstractAsyncContextManager:
        if not limited:
            return contextlib.nullcontext()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.in_flight)
        return self._slots


class KubeOnLoop:
    """The parts of `Kube` the token check uses, callable from the server's thread: each
    request runs on the controller's loop, where the client and its connections live, in
    one of the limited slots."""

    def __init__(self, kube: Kube, loop: ControllerLoop) -> None:
        self.kube = kube
        self.loop = loop

    async def request(self, *args: Any, **kwargs: Any) -> Response:
        call = functools.partial(self.kube.request, *args, **kwargs)
        return await self.loop.run(call, limited=True)
