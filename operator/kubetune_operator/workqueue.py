"""A work queue of FineTuneJob keys, as controller-runtime has: a key is queued at most once,
handled by one worker at a time (an event while it is being handled queues it again once),
and a failed key comes back after a growing delay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger("kubetune.operator")
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


class WorkQueue:
    def __init__(self, handle: Callable[[Hashable], Awaitable[None]]) -> None:
        self._handle = handle
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._dirty: set[Hashable] = set()
        self._busy: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}
        self._workers: list[asyncio.Task] = []
        self.on_handled: Callable[[bool], None] = lambda ok: None  # metrics hook

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        if delay > 0:
            self._add_later(key, delay)
            return
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._busy:
            self._queue.put_nowait(key)

    def _add_later(self, key: Hashable, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        due = loop.time() + delay
        if timer is not None and timer.when() <= due:
            return  # an earlier wake-up is already set
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(due, self._wake, key)

    def _wake(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: Hashable) -> None:
        """Drop the key's retry count and pending wake-up (its object is gone)."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()

    def start(self, workers: int) -> None:
        for i in range(workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"reconcile-{i}"))

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for timer in self._timers.values():
            timer.cancel()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._busy.add(key)
            try:
                await self._handle(key)
                self._failures.pop(key, None)
                self.on_handled(True)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.on_handled(False)
                count = self._failures[key] = self._failures.get(key, 0) + 1
                delay = RETRY_DELAYS[min(count, len(RETRY_DELAYS)) - 1]
                logger.exception("reconcile of %s failed; retrying in %.0f s", key, delay)
                self.add(key, delay)
            finally:
                self._busy.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)
