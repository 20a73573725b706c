"""Session fixtures: the tests' own project (config + a data subset), its built repository, real Triton servers.

Tests take tasks, labels and limits from `test_config` (the config the repository was built from), never
from constants, so editing config.yaml breaks no test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from testproject import write_project

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


@pytest.fixture(scope="session")
def test_config_path(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def test_config(test_config_path):
    """The typed config the session's repository is built from: tasks, labels, limits and names."""
    from mtl_build.config import load_config

    return load_config(test_config_path)


@pytest.fixture(scope="session")
def built_repository(test_config_path, tmp_path_factory) -> Path:
    """The tests' project built by mtl-build (heads_only, float32, torch runtime, fixed seed).

    MTL_TEST_REPOSITORY points at an already built one (of the same project), to skip the build when iterating.
    """
    existing = os.environ.get("MTL_TEST_REPOSITORY")
    if existing:
        return Path(existing)
    from mtl_build.cli import build

    output = tmp_path_factory.mktemp("model_repository")
    build(test_config_path, output, log=lambda message: None)
    return output


@pytest.fixture(scope="session")
def version_dir(built_repository, test_config) -> Path:
    return built_repository / test_config.serving.model_name / "1"


@pytest.fixture
def local_triton(built_repository, tmp_path):
    """Start a real bundled Triton: `local_triton(**LocalTriton options)`, on free ports, stopped after the test.

    `repository=` serves another model repository than the session's.
    """
    from mtl_serve import LocalTriton

    started = []

    def start(repository: Path | None = None, **options) -> LocalTriton:
        options.setdefault("log_file", tmp_path / f"triton-{len(started)}.log")
        for port in ("grpc_port", "http_port", "metrics_port"):
            options.setdefault(port, 0)
        server = LocalTriton(repository or built_repository, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def triton_server(built_repository, tmp_path_factory):
    """The real bundled Triton serving `built_repository` on free ports, stopped at session end."""
    from mtl_serve import LocalTriton

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with LocalTriton(built_repository, grpc_port=0, http_port=0, metrics_port=0, log_file=log) as server:
        yield server
    # Keep the log next to the test report when a run fails on CI.
    artifacts = os.environ.get("MTL_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(artifacts) / "tritonserver.log")


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI): {"ca", "cert", "key"}."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=mtl test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
