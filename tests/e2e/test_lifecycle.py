"""mtl-serve as a user runs it, and the demo command."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl_serve import free_port, group_members

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_sigterm_stops_triton_and_its_stubs(built_repository, tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    log = tmp_path / "serve.out"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [
                str(BIN / "mtl-serve"),
                "--model-repository",
                str(built_repository),
                "--grpc-port",
                ports[0],
                "--http-port",
                ports[1],
                "--metrics-port",
                ports[2],
                "--log-file",
                str(tmp_path / "triton.log"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert _wait_for(lambda: "(Ctrl-C to stop)" in log.read_text() or serve.poll() is not None, 180), (
            log.read_text()
        )
        assert serve.poll() is None, log.read_text()
        triton = [pid for pid in _children(serve.pid)]
        assert triton, "no tritonserver child found"
        group = os.getpgid(triton[0])
        members = group_members(group)
        stubs = [pid for pid in members if "triton_python_backend_stub" in _cmdline(pid)]
        assert stubs, f"no python-backend stub in Triton's process group: {[_cmdline(p) for p in members]}"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, log.read_text()
        assert group_members(group) == [], [_cmdline(p) for p in group_members(group)]
        assert "stopped" in log.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()


def test_demo_writes_one_row_per_input_row(built_repository, tmp_path):
    out_dir = tmp_path / "outputs"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl_serve.demo",
            "--skip-build",
            "--model-repository",
            str(built_repository),
            "--input",
            str(ROOT / "data" / "sample.csv"),
            "--out-dir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (ROOT / "data" / "sample.csv").open(newline="", encoding="utf-8-sig") as handle:
        inputs = list(csv.DictReader(handle))
    labels = {"topic": {"entertainment", "finance", "tech"}, "sentiment": {"negative", "neutral", "positive"}}
    for task, valid in labels.items():
        with (out_dir / f"{task}_predictions.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["id"] for r in rows] == [r["id"] for r in inputs]
        assert [r["text"] for r in rows] == [r["text"] for r in inputs]
        assert {r["label"] for r in rows} <= valid
        assert all(0.0 < float(r["score"]) <= 1.0 for r in rows)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
