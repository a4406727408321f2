"""Pushed progress is checked strictly before anything of it is stored: over real HTTP, into
the operator's real cache, a bad push gets 400 naming the field and the derived status stays
what it was."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kubetune.api.contract import ProgressEvent
from kubetune_operator import server, status
from kubetune_operator.cache import Cache
from kubetune_operator.metrics import OperatorMetrics
from tests.operator.test_builders import make_ftj
from tests.operator.test_status import job_for, pod

KEY = ("team-a", "tune")
GOOD = {"event": "step", "time": "2026-01-01T00:00:00Z", "step": 3, "totalSteps": 10}
# The longest stage that still fits the body limit (a 64 KiB body is refused before parsing).
LONG_STAGE = "s" * (server.MAX_BODY - 200)


async def allow(key: tuple[str, str], token: str) -> bool:
    return token == "token-a"


def status_of(cache: Cache) -> dict:
    ftj = make_ftj()
    job = job_for(ftj, active=1)
    observed = status.Observed(
        ftj=ftj, job=job, pods=[pod("Running", running=True)], progress=cache.progress.get(KEY)
    )
    return status.derive_status(observed, "2026-01-01T00:01:00Z").wire()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"event": "step", "time": "yesterday", "step": 4}', "time"),
        ('{"event": "step", "time": "2026-13-01T00:00:00Z", "step": 4}', "time"),
        ('{"event": "step", "time": "2026-01-01T00:00:01Z", "loss": NaN}', "loss"),
        ('{"event": "step", "time": "2026-01-01T00:00:01Z", "loss": Infinity}', "loss"),
        ('{"event": "step", "time": "2026-01-01T00:00:01Z", "evalLoss": -Infinity}', "evalLoss"),
        ('{"event": "step", "time": "2026-01-01T00:00:01Z", "step": 99999999999999}', "step"),
        ('{"event": "step", "time": "2026-01-01T00:00:01Z", "step": -1}', "step"),
        (f'{{"event": "stage", "time": "2026-01-01T00:00:01Z", "stage": "{LONG_STAGE}"}}', "stage"),
        ('{"event": "explode", "time": "2026-01-01T00:00:01Z"}', "event"),
    ],
    ids=["not-a-date", "month-13", "nan", "infinity", "minus-infinity", "huge-step",
         "negative-step", "64KiB-stage", "unknown-event"],
)  # fmt: skip
def test_a_bad_push_is_refused_naming_the_field_and_never_stored(body: str, field: str) -> None:
    cache = Cache()
    cache.observe_ftj("ADDED", {"metadata": {"namespace": KEY[0], "name": KEY[1], "uid": "u"}})

    async def main() -> None:
        app = server.build_app(
            authorize=allow, on_progress=cache.observe_progress, metrics=OperatorMetrics()
        )
        runner, port = await server.start_server(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}/v1/progress/{KEY[0]}/{KEY[1]}"
        headers = {"Authorization": "Bearer token-a", "Content-Type": "application/json"}
        try:
            async with aiohttp.ClientSession() as http:
                assert (await http.post(url, json=GOOD, headers=headers)).status == 202
                before = status_of(cache)
                response = await http.post(url, data=body.encode(), headers=headers)
                assert response.status == 400
                assert (await response.json())["error"].startswith(f"{field}:")
                assert status_of(cache) == before
                assert cache.progress[KEY]["step"] == 3
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_the_status_of_a_good_push_is_valid_json_with_display_figures() -> None:
    cache = Cache()
    cache.observe_ftj("ADDED", {"metadata": {"namespace": KEY[0], "name": KEY[1], "uid": "u"}})
    event = ProgressEvent.model_validate(
        {**GOOD, "loss": 0.6844789981842041, "learningRate": 0.00019876543, "epoch": 0.123456}
    )
    assert cache.observe_progress(KEY, event)
    progress = status_of(cache)["progress"]
    assert (progress["loss"], progress["learningRate"], progress["epoch"]) == (
        0.6845,
        0.0001988,
        0.1235,
    )
