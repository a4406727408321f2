"""The progress server runs off the controller's event loop (server.py, loops.py), wired as the
operator wires it (`handlers.serve`): while a push's handling holds its event loop (a token
check stuck, as a flood of them would be), a new FineTuneJob still gets its Job; a genuine push
still reaches the controller's cache; health and metrics are still answered from the
controller's loop."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

from kubetune_operator import handlers
from kubetune_operator.auth import PodIdentity
from kubetune_operator.controller import Controller
from kubetune_operator.loops import ControllerLoop
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.watchhealth import WatchHealth
from tests.fixtures.ftj import push
from tests.operator.test_controller_parts import FTJ, JOB, POD

# How long the stuck token check holds its loop at most: if that loop were the controller's,
# the reconcile below could only run after it, and the test fails (after this long, not never).
STUCK_FOR_S = 10.0
EVENT = b'{"event": "step", "time": "2026-01-01T00:00:00Z", "step": 3}'


class StubKube:
    """The writes a reconcile makes, answered at once; the Jobs created, announced."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.job_created = asyncio.Event()

    async def create(self, manifest: dict) -> tuple[dict, bool]:
        meta = manifest["metadata"]
        created = {**manifest, "metadata": {**meta, "uid": f"uid-{meta['name']}"}}
        if manifest["kind"] == "Job":
            self.jobs.append(meta["name"])
            self.job_created.set()
        return created, True

    async def create_quietly(self, manifest: dict) -> bool:
        return True

    async def merge_patch_quietly(self, path: str, patch: dict) -> bool:
        return True

    async def get(self, path: str) -> None:
        return None


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2 * STUCK_FOR_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def fresh_ftj(name: str) -> dict:
    return {**FTJ, "metadata": {**FTJ["metadata"], "name": name, "uid": f"ftj-{name}"}}


def test_a_stuck_progress_request_holds_up_no_reconcile_and_pushes_still_arrive() -> None:
    async def main() -> None:
        settings = OperatorSettings(listen_host="127.0.0.1", listen_port=0)
        kube = StubKube()
        metrics = OperatorMetrics()
        controller = Controller(
            settings,
            kube,  # type: ignore[arg-type]
            metrics,
            ControllerLoop(asyncio.get_running_loop()),
        )
        controller_thread = threading.current_thread()
        checking, release = threading.Event(), threading.Event()
        checks: list[tuple[threading.Thread, bool]] = []
        genuine = PodIdentity("team-a", "tune-trainer-x", "pod-1", expires_at=2e9)

        async def identify(token: str) -> PodIdentity | None:
            if token != "stuck":
                return genuine if token == "genuine" else None
            checking.set()
            # Holds the loop it runs in, as a flood of token checks would.
            released = release.wait(timeout=STUCK_FOR_S)
            checks.append((threading.current_thread(), released))
            return None

        controller.reviewer.identify = identify  # type: ignore[method-assign]
        health = WatchHealth(handlers.own_watches(settings), settings.watch_dead_after_s)
        health_checks: list[threading.Thread] = []

        def dead() -> list[str]:
            health_checks.append(threading.current_thread())
            return []

        health.dead = dead  # type: ignore[method-assign]
        handlers.state.ready = True
        server, bound = await handlers.serve(settings, controller, metrics, health)
        base = f"http://127.0.0.1:{bound.listen_port}"
        controller.start()
        try:
            stuck = asyncio.create_task(
                asyncio.to_thread(
                    push, f"{base}/v1/progress/team-a/tune", "stuck", EVENT, 2 * STUCK_FOR_S
                )
            )
            assert await asyncio.to_thread(checking.wait, STUCK_FOR_S)
            # The stuck request's check holds its loop now. A new FineTuneJob's reconcile:
            controller.observe_ftj("ADDED", fresh_ftj("fresh"))
            await asyncio.wait_for(kube.job_created.wait(), STUCK_FOR_S)
            assert kube.jobs == ["fresh-trainer"]
            release.set()
            assert await stuck == 401
            [(check_thread, released)] = checks
            assert released, "the reconcile waited for the stuck progress request"
            assert check_thread is not controller_thread

            # A genuine push of a running trainer pod still lands in the controller's cache.
            controller.observe_ftj("ADDED", FTJ)
            controller.observe_job("ADDED", JOB)
            controller.observe_pod("ADDED", POD)
            url = f"{base}/v1/progress/team-a/tune"
            assert await asyncio.to_thread(push, url, "genuine", EVENT, 2 * STUCK_FOR_S) == 202
            assert controller.cache.progress[("team-a", "tune")]["step"] == 3
            assert await asyncio.to_thread(push, url, "forged", EVENT, 2 * STUCK_FOR_S) == 401

            # Liveness is still the controller loop's answer (a wedged loop fails it).
            assert await asyncio.to_thread(get, f"{base}/healthz") == 200
            assert health_checks == [controller_thread]
            assert await asyncio.to_thread(get, f"{base}/readyz") == 200
            assert await asyncio.to_thread(get, f"{base}/metrics") == 200
        finally:
            release.set()
            handlers.state.ready = False
            await controller.stop()
            await server.stop()

    asyncio.run(main())


def test_calls_cross_to_the_controllers_loop_and_back() -> None:
    """ControllerLoop from another thread's loop: results and exceptions come back, at most
    `in_flight` limited calls are on the controller's loop at once, and posts keep order."""

    async def main() -> None:
        controller_thread = threading.current_thread()
        here = ControllerLoop(asyncio.get_running_loop(), in_flight=2)
        running, most = 0, 0
        gate = asyncio.Event()
        order: list[int] = []

        async def held() -> threading.Thread:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await gate.wait()
            running -= 1
            return threading.current_thread()

        def fail() -> None:
            raise LookupError("no such pod")

        async def elsewhere() -> None:
            assert await here.call(threading.current_thread) is controller_thread
            try:
                await here.call(fail)
            except LookupError as exc:
                assert str(exc) == "no such pod"
            else:
                raise AssertionError("the exception did not come back")
            calls = [asyncio.create_task(here.run(held, limited=True)) for _ in range(5)]
            await here.call(lambda: None)  # the controller's loop has had its turn
            await here.run(asyncio.sleep, 0)  # and another: the first two calls are held now
            await here.call(gate.set)
            assert set(await asyncio.gather(*calls)) == {controller_thread}
            for number in range(100):
                here.post(order.append, number)
            await here.call(lambda: None)

        await asyncio.to_thread(asyncio.run, elsewhere())
        assert most == 2
        assert order == list(range(100))

    asyncio.run(main())
