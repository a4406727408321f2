"""A throwaway S3 API for the demo and the tests: moto's server, a thread of this process,
on a free port of a given address (the node's host address, where pods reach it).

moto is in the devcluster dependency group, not the base install.
"""

from __future__ import annotations

import logging
from typing import Any

REGION = "us-east-1"


class S3Endpoint:
    """moto's S3 server on a free port of `host`; it accepts any keys, so the ones given
    are only what clients (and FineTuneJobs' Secrets) present."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        access_key: str = "testing",
        secret_key: str = "testing",
        region: str = REGION,
    ) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "moto is not installed: run `uv sync` (its devcluster group has it)"
            ) from exc
        # Its web server logs every request at INFO: hundreds of lines in a demo or a test.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self._server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
        self._server.start()
        bound_host, port = self._server.get_host_and_port()
        self.url = f"http://{bound_host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point a client (boto3, the trainer) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def stop(self) -> None:
        self._server.stop()
