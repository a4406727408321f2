"""Forged progress tokens in a burst: does a new FineTuneJob still get its Job promptly?

    .venv/bin/python bench/bench_forged_tokens.py [--forged 1000] [--jobs 10] [--concurrency 50]

On the local control plane (process node) with the operator as a host process:
1. Quiet: `--jobs` suspended FineTuneJobs created one after another; for each, the time from
   its create call returning to its Job existing (create-to-Job latency).
2. Flood: `--forged` forged tokens POSTed to the progress endpoint at once from
   `--concurrency` threads, while FineTuneJobs are created the same way until it ends.
   The tokens are the worst case for the operator: well-formed JWTs of the right audience,
   naming the API server's real signing key id, each different (no cache helps), signed with
   another key; each claims a different source address, so the per-source limit on failed
   pushes does not stop them and every one reaches the signature check.
3. Noise floor: the same flood sent to a do-nothing HTTP server in another process (it
   answers 401 at once), while FineTuneJobs are created the same way: what the flood's client
   alone costs the machine (on a small shared machine, most of the slowdown).
Prints the median and worst latency of each, the ratios to quiet (target: within 2x), the
answers the flood got, and the TokenReviews the operator sent during it (target: none).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

AUDIENCE = "kubetune.io/progress"
FORWARDED_FOR_HEADER = "X-Kubetune-Forwarded-For"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged_tokens(count: int, kid: str, issuer: str) -> list[str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = b64(json.dumps({"alg": "RS256", "kid": kid}).encode())
    tokens = []
    for _ in range(count):
        claims = {
            "aud": [AUDIENCE],
            "iss": issuer,
            "exp": int(time.time()) + 3600,
            "sub": "system:serviceaccount:bench:default",
            "jti": uuid.uuid4().hex,
        }
        data = f"{header}.{b64(json.dumps(claims).encode())}"
        signature = key.sign(data.encode(), padding.PKCS1v15(), hashes.SHA256())
        tokens.append(f"{data}.{b64(signature)}")
    return tokens


def ftj(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://bench/models/tiny/"},
            "dataset": {"uri": "s3://bench/data/train.jsonl"},
            "output": {"uri": "s3://bench/runs/"},
            "resources": {"gpus": 0, "cpu": "10m", "memory": "64Mi", "shmSize": "1Mi"},
            "suspend": True,
        },
    }


def create_to_job(rest, ns: str, name: str) -> float:  # noqa: ANN001
    """Seconds from the FineTuneJob's creation to its Job's (polled every 10 ms)."""
    from kubetune_devcluster.rest import ApiError

    rest.post(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs", ftj(name))
    start = time.monotonic()
    while time.monotonic() - start < 60:
        try:
            rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer")
            return time.monotonic() - start
        except ApiError as exc:
            if exc.status != 404:
                raise
        time.sleep(0.01)
    raise TimeoutError(f"no Job for {name} within 60 s")


def push(url: str, token: str, source: str) -> int:
    request = urllib.request.Request(
        url,
        data=b'{"event": "step", "time": "2026-01-01T00:00:00Z", "step": 1}',
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            FORWARDED_FOR_HEADER: source,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


DO_NOTHING_SERVER = """
import sys
from aiohttp import web
async def refuse(request):
    await request.read()
    return web.json_response({"error": "unauthorized"}, status=401)
app = web.Application()
app.router.add_post("/{tail:.*}", refuse)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def flood_while_creating(rest, ns: str, prefix: str, url: str, tokens, concurrency: int):  # noqa: ANN001, ANN201
    """(answers, create-to-Job latencies, seconds): the flood from `concurrency` threads, and
    FineTuneJobs created one after another until it ends."""
    answers: list[int] = []
    started = threading.Event()

    def flood() -> None:
        with ThreadPoolExecutor(concurrency) as pool:
            started.set()
            answers.extend(
                pool.map(lambda it: push(url, it[1], f"10.1.{it[0] // 250}.{it[0] % 250}"),
                         enumerate(tokens))
            )  # fmt: skip

    begun = time.monotonic()
    flooder = threading.Thread(target=flood)
    flooder.start()
    started.wait()
    latencies: list[float] = []
    while flooder.is_alive():
        latencies.append(create_to_job(rest, ns, f"{prefix}-{len(latencies)}"))
    flooder.join()
    return answers, latencies, time.monotonic() - begun


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forged", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()

    from kubetune_devcluster.controlplane import DevCluster
    from kubetune_devcluster.operatorprocess import OperatorProcess
    from kubetune_devcluster.processes import free_port, wait_for
    from kubetune_devcluster.stack import install_crd

    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cluster = DevCluster.start(state)
    rest = cluster.rest()
    try:
        install_crd(cluster)
        ns = "bench"
        rest.post(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        )
        op = OperatorProcess(
            cluster, state / "operator.log", extra_args=["--namespace", ns, "--patch-interval", "5"]
        )
        op.start()
        issuer = rest.get("/.well-known/openid-configuration")["issuer"]
        # The API server's signing key id, from a real token's header.
        wait_for(
            lambda: rest.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"),
            timeout=30,
            what="default ServiceAccount",
        )
        real = rest.post(
            f"/api/v1/namespaces/{ns}/serviceaccounts/default/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"audiences": [AUDIENCE], "expirationSeconds": 600}},
        )["status"]["token"]  # fmt: skip
        kid = json.loads(base64.urlsafe_b64decode(real.split(".")[0] + "=="))["kid"]
        tokens = forged_tokens(args.forged, kid, issuer)
        url = f"{op.url}/v1/progress/{ns}/victim"

        quiet = [create_to_job(rest, ns, f"quiet-{i}") for i in range(args.jobs)]

        reviews_before = op.metric("kubetune_token_reviews_total")
        answers, loaded, flood_s = flood_while_creating(
            rest, ns, "loaded", url, tokens, args.concurrency
        )
        reviews = op.metric("kubetune_token_reviews_total") - reviews_before
        refused = op.metric("kubetune_progress_tokens_refused_total", {"reason": "bad signature"})

        port = free_port()
        dummy = subprocess.Popen([sys.executable, "-c", DO_NOTHING_SERVER, str(port)])
        try:
            wait_for(lambda: push(f"http://127.0.0.1:{port}/", "x", "") == 401, timeout=30)
            _, floor, _ = flood_while_creating(
                rest, ns, "floor", f"http://127.0.0.1:{port}/", tokens, args.concurrency
            )
        finally:
            dummy.terminate()
            dummy.wait()

        counts = {str(code): answers.count(code) for code in sorted(set(answers))}
        quiet_median = statistics.median(quiet)
        result = {
            "forged": args.forged,
            "flood_seconds": round(flood_s, 2),
            "flood_answers": counts,
            "token_reviews_during_flood": reviews,
            "refused_bad_signature": refused,
            "quiet": summary(quiet),
            "flood": {**summary(loaded), "jobs": len(loaded)},
            "noise_floor": {**summary(floor), "jobs": len(floor)},
            "flood_median_ratio": round(statistics.median(loaded) / quiet_median, 2),
            "noise_floor_median_ratio": round(statistics.median(floor) / quiet_median, 2),
        }
        print(json.dumps(result, indent=2))
        op.stop()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
