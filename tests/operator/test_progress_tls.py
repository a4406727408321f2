"""The progress endpoint over TLS: served from a mounted kubernetes.io/tls Secret's files, the
trainer pod given the CA (and only then does its reporter trust the endpoint), a client
without it refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubetune.api import contract
from kubetune.api.contract import ProgressEvent
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import builders, server
from kubetune_operator.handlers import serving_tls
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.progress import HttpReporter


def self_signed(folder: Path) -> str:
    """tls.crt and tls.key in `folder`, as the kubelet mounts a kubernetes.io/tls Secret;
    returns the certificate's PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-progress")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (folder / "tls.crt").write_text(pem)
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def test_https_endpoint_reached_by_a_trainer_given_the_ca_only(tmp_path: Path) -> None:
    pem = self_signed(tmp_path)
    settings = OperatorSettings(tls_dir=str(tmp_path), listen_host="127.0.0.1", listen_port=0)
    assert settings.progress_ca_pem == pem  # self-signed: the certificate is its own CA
    received: list[ProgressEvent] = []

    async def allow(key: tuple[str, str], token: str) -> bool:
        return token == "t"

    app = server.build_app(
        authorize=allow, on_progress=lambda key, event: received.append(event),
        metrics=OperatorMetrics(),
    )  # fmt: skip

    def push(url: str, ca: str | None) -> tuple[int, int]:
        reporter = HttpReporter(url, "t", ca_pem=ca, timeout_s=5)
        reporter.emit(ProgressEvent(event="step", time="2026-01-01T00:00:00Z", step=7))
        reporter.close()
        return reporter.stats.sent, reporter.stats.failed

    async def body() -> None:
        runner, port = await server.start_server(app, "127.0.0.1", 0, serving_tls(settings))
        try:
            url = f"https://127.0.0.1:{port}/v1/progress/team-a/tune"
            assert await asyncio.to_thread(push, url, pem) == (1, 0)
            assert await asyncio.to_thread(push, url, None) == (0, 1)  # unverifiable: refused
            plain = f"http://127.0.0.1:{port}/v1/progress/team-a/tune"
            assert await asyncio.to_thread(push, plain, None) == (0, 1)  # HTTPS only
        finally:
            await runner.cleanup()

    asyncio.run(body())
    assert [e.step for e in received] == [7]

    # The trainer pod gets the CA, and an https progress URL.
    ftj = FineTuneJob.model_validate(
        {
            "metadata": {"name": "tune", "namespace": "team-a", "uid": "u"},
            "spec": {
                "model": {"uri": "s3://m/tiny/"},
                "dataset": {"uri": "s3://d/train.jsonl"},
                "output": {"uri": "s3://o/runs/"},
            },
        }
    )
    env = {e["name"]: e.get("value") for e in builders.build_env(ftj, settings)}
    assert env[contract.ENV_PROGRESS_CA] == pem
    assert env[contract.ENV_PROGRESS_URL].startswith("https://")
    plain_settings = OperatorSettings()
    assert contract.ENV_PROGRESS_CA not in {
        e["name"] for e in builders.build_env(ftj, plain_settings)
    }
