"""The CLI without a server: help, option checks, and bad input found before anything is sent."""
import socket
import time

import pytest
from click.testing import CliRunner

from mtl_client.cli import main


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def run(tmp_path):
    def invoke(*args, input=None):
        return CliRunner().invoke(main, [str(a) for a in args], input=input)
    return invoke


def _csv(tmp_path, data: bytes, name="in.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_help_documents_commands_options_and_exit_codes(run):
    result = run("--help")
    assert result.exit_code == 0
    for word in ("predict", "health", "info", "Exit codes", "130"):
        assert word in result.output
    result = run("predict", "--help")
    for option in ("--text-column", "--id-column", "--out-dir", "--url", "--model", "--batch-size", "--concurrency",
                   "--timeout", "--retries", "--format", "--probs", "--encoding", "--allow-empty", "--header",
                   "--root-certificates"):
        assert option in result.output


@pytest.mark.parametrize("data, message", [
    (b"", "in.csv: the file is empty (no header row)"),
    (b"id,text\n", "in.csv: the file has a header (id, text) but no data rows"),
    (b"id,body\n1,x\n", "in.csv: no column 'text'; columns found: 'id', 'body' (choose one with --text-column)"),
    (b"id,text\n1,ok\n2,caf\xe9\n", "in.csv: row 2 (line 3) is not valid utf-8"),
    (b"id,text\n1,ok\n2, \n3,\n4,fine\n", "in.csv: 2 row(s) with an empty or whitespace-only text: row 2, 3 "),
])
def test_bad_input_exits_2_with_one_line_before_contacting_the_server(run, tmp_path, data, message):
    path = _csv(tmp_path, data)
    result = run("predict", path, "--url", _closed_port_url(), "--out-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("mtl-client: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_input_file(run, tmp_path):
    result = run("predict", tmp_path / "nope.csv", "--url", _closed_port_url())
    assert result.exit_code == 2 and "nope.csv: no such file" in result.stderr


def test_unreachable_server_exits_1_quickly(run, tmp_path):
    path = _csv(tmp_path, b"id,text\n1,hello\n")
    started = time.monotonic()
    result = run("predict", path, "--url", _closed_port_url(), "--retries", 0, "--timeout", 2,
                 "--out-dir", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "is unavailable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out").exists()
    for command in ("health", "info"):
        result = run(command, "--url", _closed_port_url(), "--retries", 0)
        assert result.exit_code == 1 and "unavailable" in result.stderr


def test_option_errors_are_one_line_usage_errors(run, tmp_path):
    path = _csv(tmp_path, b"id,text\n1,hello\n")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["predict", path, "--url", "http://localhost:8000"], "Invalid value for '--url': http://localhost:8000 is an HTTP url"),
        (["predict", path, "--encoding", "klingon"], "unknown encoding 'klingon'"),
        (["predict", path, "--batch-size", 0], "Invalid value for '--batch-size'"),
        (["predict", path, "--header", "no-separator"], "is not NAME=VALUE"),
        (["predict", path, "--out-dir", tmp_path / "afile"], "Invalid value for '--out-dir'"),
        (["predict"], "Missing argument 'INPUT'"),
        (["nosuch"], "No such command 'nosuch'"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("mtl-client: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_explicit_id_column_must_exist(run, tmp_path):
    path = _csv(tmp_path, b"text\nhello\n")
    result = run("predict", path, "--id-column", "key", "--url", _closed_port_url())
    assert result.exit_code == 2 and "no id column 'key'" in result.stderr
