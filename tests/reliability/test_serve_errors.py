"""`mtl-serve` on a broken setup: a clear one-line error and a non-zero exit, never a hang."""

from __future__ import annotations

import socket
import time

import pytest
from rel_helpers import BIN, COUNTS, copy_repository, run

from mtl_serve import free_port

pytestmark = pytest.mark.reliability
# Far above the ~10 s a failing start takes here; a hang would hit it.
LIMIT_S = 120


def _serve(repository, tmp_path, *ports: int) -> tuple[int, str, float]:
    grpc, http, metrics = (ports + (0, 0, 0))[:3] if ports else (0, 0, 0)
    COUNTS.inputs += 1
    started = time.monotonic()
    result = run(
        [
            str(BIN / "mtl-serve"),
            "--model-repository",
            str(repository),
            "--grpc-port",
            str(grpc or free_port()),
            "--http-port",
            str(http or free_port()),
            "--metrics-port",
            str(metrics or free_port()),
            "--log-file",
            str(tmp_path / "triton.log"),
        ],
        timeout=LIMIT_S,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def test_missing_repository(tmp_path):
    code, err, _ = _serve(tmp_path / "nowhere", tmp_path)
    COUNTS.faults += 1
    assert code == 2, err
    assert "mtl-serve: error: model repository" in err and "does not exist: run mtl-build first" in err
    assert "starting" not in err, err  # refused before it says it is starting


def test_repository_without_models(tmp_path):
    (tmp_path / "empty").mkdir()
    code, err, _ = _serve(tmp_path / "empty", tmp_path)
    COUNTS.faults += 1
    assert code == 2 and "holds no model" in err, err


@pytest.mark.parametrize("which", ["grpc", "http", "metrics"])
def test_busy_port(built_repository, tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"grpc": (busy, 0, 0), "http": (0, busy, 0), "metrics": (0, 0, busy)}[which]
        code, err, _ = _serve(built_repository, tmp_path, *ports)
    COUNTS.faults += 1
    label = {"grpc": "gRPC", "http": "HTTP", "metrics": "metrics"}[which]
    assert code == 2, err
    assert f"mtl-serve: error: {label} port {busy} is already in use" in err, err
    assert "starting" not in err, err


def test_corrupt_artifact_fails_the_load(built_repository, tmp_path):
    repository = copy_repository(built_repository, tmp_path / "repo")
    weights = repository / "multitask" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern deep inside a tensor: loadable, but not what was built
    weights.write_bytes(bytes(data))
    code, err, took = _serve(repository, tmp_path)
    COUNTS.faults += 1
    assert code == 1, err
    assert "tritonserver exited with code 1 during start-up" in err and "weights.safetensors has SHA-256" in err, err
    assert "is corrupt or was replaced" in err
    assert took < 60, took
