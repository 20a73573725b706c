"""`mtl-client predict` while the server dies, restarts, loses a model process, or the CLI itself is interrupted.

No run may leave a partial output file; a run that reports success has every input row exactly once,
in input order. Servers that are killed or restarted are this module's own (the `local_triton` fixture).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from rel_helpers import BIN, COUNTS, read_output, write_csv
from tritonclient.utils import InferenceServerException

from mtl_client import ModelContract

pytestmark = pytest.mark.reliability
ROWS = 1500
OLD = "id,text,label,score,truncated\nold,an earlier run's output,tech,0.9,false\n"
# A few thousand rows: the run is still going when a stub dies and while the watchdog restarts Triton.
STUB_KILL_ROWS = 3000


@pytest.fixture(scope="module")
def input_csv(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    path = tmp_path_factory.mktemp("fault-input") / "input.csv"
    return path, write_csv(path, ROWS)


@pytest.fixture(scope="module")
def output_files(test_config) -> dict[str, str]:
    """{task: output file name}, as the session's repository was built (config.yaml's serving.output_filename)."""
    return {task.name: test_config.serving.output_filename.replace("{task}", task.name) for task in test_config.tasks}


def _out_dir(tmp_path: Path, output_files: dict[str, str]) -> Path:
    """An output folder holding an earlier run's file, which a failed run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / next(iter(output_files.values()))).write_text(OLD)
    return out


def _predict(url: str, csv_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    COUNTS.inputs += 1
    return subprocess.Popen(
        [
            str(BIN / "mtl-client"),
            "predict",
            str(csv_path),
            "--url",
            url,
            "--out-dir",
            str(out),
            "--batch-size",
            "32",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_rows_flowing(out: Path, cli: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the CLI has written rows into its temp files (it is in the middle of the run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert cli.poll() is None, cli.communicate()
        if any(p.stat().st_size > 2000 for p in out.glob(".*.tmp")):
            return
        time.sleep(0.05)
    raise AssertionError("the CLI never started writing rows")


def _assert_untouched(out: Path, output_files: dict[str, str]) -> None:
    first = next(iter(output_files.values()))
    assert sorted(p.name for p in out.iterdir()) == [first], list(out.iterdir())
    assert (out / first).read_text() == OLD


def _check_complete(out: Path, rows: list[tuple[str, str]], output_files: dict[str, str]) -> None:
    for task, name in output_files.items():
        written = read_output(out / name)
        expected_ids = [row_id for row_id, _ in rows]
        got_ids = [r["id"] for r in written]
        # A row counts as delivered only at its own position: a missing, repeated or moved row is lost.
        COUNTS.rows(len(rows), sum(1 for a, b in zip(got_ids, expected_ids) if a == b))
        assert got_ids == expected_ids, f"{task}: {len(got_ids)} rows written for {len(rows)} input rows"
        assert [r["text"] for r in written] == [text for _, text in rows]
        assert all(r["label"] for r in written)
    assert not list(out.glob(".*.tmp"))


def test_killing_the_server_mid_run_fails_the_cli_cleanly(local_triton, input_csv, output_files, tmp_path):
    csv_path, _ = input_csv
    out = _out_dir(tmp_path, output_files)
    server = local_triton(watchdog=False)
    cli = _predict(server.grpc_url, csv_path, out, "--retries", "2", "--timeout", "20")
    _wait_rows_flowing(out, cli)
    os.killpg(server.pid, signal.SIGKILL)
    COUNTS.faults += 1
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("mtl-client: error: ") and "unavailable" in lines[-1], stderr
    _assert_untouched(out, output_files)


# A graceful stop unloads the model before Triton exits: for about a second, calls get NOT_FOUND "'multitask'
# has no available versions" (and in-flight ones CANCELLED); mtl_client retries both as transient.


@pytest.mark.parametrize("how", ["crash", "graceful"])
def test_restarting_the_server_mid_run_with_retries_loses_no_row(local_triton, input_csv, output_files, tmp_path, how):
    """`crash`: SIGKILL of Triton's process group; `graceful`: LocalTriton.stop() (SIGTERM, drain). Same ports."""
    csv_path, rows = input_csv
    out = tmp_path / "out"
    server = local_triton()
    cli = _predict(server.grpc_url, csv_path, out, "--retries", "30", "--timeout", "30")
    _wait_rows_flowing(out, cli)
    if how == "crash":
        os.killpg(server.pid, signal.SIGKILL)
    server.stop()
    COUNTS.faults += 1
    local_triton(grpc_port=server.grpc_port, http_port=server.http_port, metrics_port=server.metrics_port)
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, (stdout, stderr)
    _check_complete(out, rows, output_files)


def test_a_stub_killed_mid_run_is_repaired_and_the_run_completes(local_triton, output_files, tmp_path):
    """The issue's repro, as a user meets it: kill -9 of a python-backend stub 2 s into a run of 3,000 rows
    against mtl-serve (its watchdog restarts Triton on the same ports); the run completes, every row once."""
    csv_path = tmp_path / "input.csv"
    rows = write_csv(csv_path, STUB_KILL_ROWS)
    out = tmp_path / "out"
    server = local_triton()
    cli = _predict(server.grpc_url, csv_path, out, "--retries", "30", "--timeout", "30")
    _wait_rows_flowing(out, cli)
    stubs = server.stub_pids()
    assert stubs, "no python-backend stub found"
    os.kill(stubs[0], signal.SIGKILL)
    COUNTS.faults += 1
    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, (stdout, stderr)
    # The fault was real and repaired while the run went on.
    assert server.restarts == 1, server.events
    _check_complete(out, rows, output_files)


def test_triton_answering_stub_not_healthy_is_retried_until_repaired(
    local_triton, input_csv, output_files, test_config, tmp_path
):
    """Triton's own answer to a dead stub, INTERNAL "Stub process '...' is not healthy." (what the CLI failed on
    before), reaches the client for certain here: no gRPC guard (which would make it UNAVAILABLE), no watchdog
    (which might restart Triton first). The test makes the watchdog's repair itself once the answer is seen."""
    csv_path, rows = input_csv
    out = tmp_path / "out"
    server = local_triton(grpc_guard=False, watchdog=False)
    cli = _predict(server.grpc_url, csv_path, out, "--retries", "40", "--timeout", "30")
    _wait_rows_flowing(out, cli)
    for stub in server.stub_pids():  # every instance: each of the CLI's requests meets the dead stub
        os.kill(stub, signal.SIGKILL)
    COUNTS.faults += 1
    answer = _answer_once_broken(server.grpc_url, test_config.serving.model_name)
    assert re.search(r"Stub process '[^']*' is not healthy", answer), answer
    time.sleep(2)  # the CLI's requests meanwhile get the same answer, and retry
    assert cli.poll() is None, cli.communicate()
    server.stop()
    local_triton(
        grpc_port=server.grpc_port, http_port=server.http_port, metrics_port=server.metrics_port, grpc_guard=False
    )
    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, (stdout, stderr)
    _check_complete(out, rows, output_files)


def _answer_once_broken(url: str, model: str, timeout_s: float = 60) -> str:
    """The first error Triton gives a one-row inference (raw tritonclient, no retries)."""
    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(url) as client:
        contract = ModelContract.from_model_config(client.get_model_config(model, as_json=True), model)
        while time.monotonic() < deadline:
            inputs, outputs = contract.request([b"the market rallied"])
            try:
                client.infer(model, inputs, outputs=outputs, client_timeout=10)
            except InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"
            time.sleep(0.05)
    raise AssertionError(f"Triton kept answering for {timeout_s:.0f}s after its stubs were killed")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_cli_leaves_no_partial_file(rel_server, input_csv, output_files, tmp_path, sig):
    csv_path, _ = input_csv
    out = _out_dir(tmp_path, output_files)
    cli = _predict(rel_server.grpc_url, csv_path, out)
    _wait_rows_flowing(out, cli)
    cli.send_signal(sig)
    COUNTS.faults += 1
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr, stderr
    _assert_untouched(out, output_files)
