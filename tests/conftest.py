"""Session fixtures: one model repository built from config.yaml, one real Triton server on free ports."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory) -> Path:
    """A model repository built by mtl-build (heads_only, float32, fixed seed) from the project's config and data.

    float32, so that served results can be held to transformers' within 1e-4 (tests/e2e/test_parity.py);
    tests/e2e/test_precision.py serves the same weights with serving.precision auto.
    MTL_TEST_REPOSITORY points at an already built one (built with --precision float32), to skip the ~30 s
    build when iterating locally.
    """
    existing = os.environ.get("MTL_TEST_REPOSITORY")
    if existing:
        return Path(existing)
    from mtl_build.cli import build

    output = tmp_path_factory.mktemp("model_repository")
    build(CONFIG, output, mode="heads_only", precision="float32")
    return output


@pytest.fixture(scope="session")
def triton_server(built_repository, tmp_path_factory):
    """The real bundled Triton serving `built_repository` on free ports, stopped at session end."""
    from mtl_serve import LocalTriton

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = LocalTriton(built_repository, grpc_port=0, http_port=0, metrics_port=0, log_file=log)
    with server:
        yield server
    # Keep the log next to the test report when a run fails on CI.
    artifacts = os.environ.get("MTL_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(artifacts) / "tritonserver.log")
