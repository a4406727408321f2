"""Tests of the test harness itself: the checks the long-running tests rely on must be able
to fail. Pure (S3 is moto's server): no cluster, no node."""
