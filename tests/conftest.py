"""Shared pytest configuration: fixtures live in tests/fixtures/ and are loaded as plugins."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.tiny_model",
    "tests.fixtures.cluster",
    "tests.fixtures.real_node",
    "tests.fixtures.mlflow",
]
