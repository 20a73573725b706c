"""pytest plugin of client/ci/test-numpy2.sh: the session fixtures of tests/conftest.py, for a venv without the
server's packages (no torch, no mtl_build, no mtl_serve), backed by a server started outside the run.

    MTL_CLIENT_TEST_URL  gRPC host:port of a real Triton serving the tests' project
    MTL_TEST_PROJECT     folder of that project's config.yaml and data (validation.csv)
    MTL_EXPECT_NUMPY     the numpy major version the run must be using (2)
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import yaml


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise pytest.UsageError(f"{name} is not set (client/ci/test-numpy2.sh sets it)")
    return value


def pytest_configure(config) -> None:
    expected = os.environ.get("MTL_EXPECT_NUMPY")
    if expected and numpy.__version__.split(".")[0] != expected:
        raise pytest.UsageError(f"this run must use numpy {expected}.x, but numpy {numpy.__version__} is installed")


def pytest_report_header(config) -> str:
    import mtl_client

    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("tritonclient", "grpcio", "click"))
    return (
        f"numpy {numpy.__version__}, {versions}; mtl_client from {Path(mtl_client.__file__).parent}; "
        f"server {os.environ.get('MTL_CLIENT_TEST_URL')}"
    )


@pytest.fixture(scope="session")
def test_config_path() -> Path:
    path = Path(_required("MTL_TEST_PROJECT")) / "config.yaml"
    if not path.is_file():
        raise pytest.UsageError(f"{path} does not exist: MTL_TEST_PROJECT must hold the tests' project")
    return path


@pytest.fixture(scope="session")
def test_config(test_config_path):
    """The fields of mtl_build's typed config that the client tests read, from the same config.yaml."""
    raw = yaml.safe_load(test_config_path.read_text())
    tasks = [SimpleNamespace(name=task["name"], labels=list(task["labels"])) for task in raw["tasks"]]
    return SimpleNamespace(
        tasks=tasks,
        serving=SimpleNamespace(**raw["serving"]),
        data=SimpleNamespace(**raw["data"]),
        backbone=SimpleNamespace(**raw["backbone"]),
    )


@pytest.fixture(scope="session")
def triton_server():
    return SimpleNamespace(grpc_url=_required("MTL_CLIENT_TEST_URL"))
