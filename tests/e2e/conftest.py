"""Fixtures of the end-to-end tests that run the operator as a host process on the test
control plane (the real-node tests have theirs in tests/fixtures/real_node.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune_devcluster.controlplane import DevCluster
from tests.fixtures.ftj import add_credentials_secret
from tests.fixtures.operator import OperatorProcess, running_operator
from tests.fixtures.s3 import S3Server
from tests.fixtures.tiny_model import upload_tiny_assets


@pytest.fixture(scope="module")
def assets(s3_server: S3Server) -> str:
    """A bucket holding the tiny model, the demo dataset and a dataset with no text field
    (data/bad.jsonl); returns its name."""
    s3 = s3_server.client()
    bucket = upload_tiny_assets(s3, "kubetune-e2e", rows=96)
    s3.put_object(Bucket=bucket, Key="data/bad.jsonl", Body=b'{"colour": "blue"}\n' * 20)
    return bucket


@pytest.fixture(scope="module")
def operator(
    k8s_cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, running trainers as host processes, for the tests of one module."""
    with running_operator(k8s_cluster, tmp_path_factory.mktemp("operator")) as op:
        yield op


@pytest.fixture
def ns(k8s_cluster: DevCluster, k8s_namespace: str, s3_server: S3Server) -> str:
    """A namespace with the S3 credentials Secret the FineTuneJobs reference."""
    add_credentials_secret(k8s_cluster, k8s_namespace, dict(s3_server.env))
    return k8s_namespace
