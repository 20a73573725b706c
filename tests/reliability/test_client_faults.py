"""`mtl-client predict` while the server dies, restarts, or the CLI itself is interrupted.

No run may leave a partial output file; a run that reports success has every input row exactly once,
in input order. Servers that are killed or restarted are this module's own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mtl_serve import LocalTriton
from rel_helpers import BIN, COUNTS, read_output, write_csv

pytestmark = pytest.mark.reliability
ROWS = 1500
OLD = "id,text,label,score,truncated\nold,an earlier run's output,tech,0.9,false\n"


@pytest.fixture(scope="module")
def input_csv(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    path = tmp_path_factory.mktemp("fault-input") / "input.csv"
    return path, write_csv(path, ROWS)


def _out_dir(tmp_path: Path) -> Path:
    """An output folder holding an earlier run's file, which a failed run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "topic_predictions.csv").write_text(OLD)
    return out


def _predict(url: str, csv_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    COUNTS.inputs += 1
    return subprocess.Popen([str(BIN / "mtl-client"), "predict", str(csv_path), "--url", url, "--out-dir", str(out),
                             "--batch-size", "32", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows_flowing(out: Path, cli: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the CLI has written rows into its temp files (it is in the middle of the run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert cli.poll() is None, cli.communicate()
        if any(p.stat().st_size > 2000 for p in out.glob(".*.tmp")):
            return
        time.sleep(0.05)
    raise AssertionError("the CLI never started writing rows")


def _assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["topic_predictions.csv"], list(out.iterdir())
    assert (out / "topic_predictions.csv").read_text() == OLD


def _check_complete(out: Path, rows: list[tuple[str, str]]) -> None:
    for task in ("topic", "sentiment"):
        written = read_output(out / f"{task}_predictions.csv")
        expected_ids = [row_id for row_id, _ in rows]
        got_ids = [r["id"] for r in written]
        # A row counts as delivered only at its own position: a missing, repeated or moved row is lost.
        COUNTS.rows(len(rows), sum(1 for a, b in zip(got_ids, expected_ids) if a == b))
        assert got_ids == expected_ids, f"{task}: {len(got_ids)} rows written for {len(rows)} input rows"
        assert [r["text"] for r in written] == [text for _, text in rows]
        assert all(r["label"] for r in written)
    assert not list(out.glob(".*.tmp"))


def test_killing_the_server_mid_run_fails_the_cli_cleanly(built_repository, input_csv, tmp_path):
    csv_path, _ = input_csv
    out = _out_dir(tmp_path)
    with LocalTriton(built_repository, 0, 0, 0, log_file=tmp_path / "triton.log", watchdog=False) as server:
        cli = _predict(server.grpc_url, csv_path, out, "--retries", "2", "--timeout", "20")
        _wait_rows_flowing(out, cli)
        os.killpg(server.pid, signal.SIGKILL)
        COUNTS.faults += 1
        stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("mtl-client: error: ") and "unavailable" in lines[-1], stderr
    _assert_untouched(out)


# A graceful stop unloads the model before Triton exits: for about a second, calls get NOT_FOUND "'multitask'
# has no available versions" (and in-flight ones CANCELLED); mtl_client retries both as transient.


@pytest.mark.parametrize("how", ["crash", "graceful"])
def test_restarting_the_server_mid_run_with_retries_loses_no_row(built_repository, input_csv, tmp_path, how):
    """`crash`: SIGKILL of Triton's process group; `graceful`: LocalTriton.stop() (SIGTERM, drain). Same ports."""
    csv_path, rows = input_csv
    out = tmp_path / "out"
    server = LocalTriton(built_repository, 0, 0, 0, log_file=tmp_path / "triton.log").start()
    try:
        cli = _predict(server.grpc_url, csv_path, out, "--retries", "30", "--timeout", "30")
        _wait_rows_flowing(out, cli)
        if how == "crash":
            os.killpg(server.pid, signal.SIGKILL)
        server.stop()
        COUNTS.faults += 1
        server = LocalTriton(built_repository, server.grpc_port, server.http_port, server.metrics_port,
                             log_file=tmp_path / "triton-restarted.log").start()
        stdout, stderr = cli.communicate(timeout=300)
    finally:
        server.stop()
    assert cli.returncode == 0, (stdout, stderr)
    _check_complete(out, rows)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_cli_leaves_no_partial_file(rel_server, input_csv, tmp_path, sig):
    csv_path, _ = input_csv
    out = _out_dir(tmp_path)
    cli = _predict(rel_server.grpc_url, csv_path, out)
    _wait_rows_flowing(out, cli)
    cli.send_signal(sig)
    COUNTS.faults += 1
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr, stderr
    _assert_untouched(out)
