"""The CLI without a server: help, option checks, and bad input found before anything is sent."""

import importlib.metadata
import json
import socket
import subprocess
import sys
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
    for word in ("predict", "evaluate", "health", "info", "Exit codes", "130", "--version"):
        assert word in result.output
    result = run("predict", "--help")
    for option in (
        "--text-column",
        "--id-column",
        "--out-dir",
        "--url",
        "--model",
        "--batch-size",
        "--concurrency",
        "--timeout",
        "--retries",
        "--format",
        "--probs",
        "--encoding",
        "--delimiter",
        "--allow-empty",
        "--header",
        "--root-certificates",
    ):
        assert option in result.output
    result = run("evaluate", "--help")
    for option in (
        "--text-column",
        "--delimiter",
        "--encoding",
        "--batch-size",
        "--concurrency",
        "--json",
        "--plot",
        "--url",
        "--retries",
        "--root-certificates",
    ):
        assert option in result.output


def test_version(run):
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"mtl-client {importlib.metadata.version('mtl-client')}\n"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "in.csv: the file is empty (no header row)"),
        (b"id,text\n", "in.csv: the file has a header (id, text) but no data rows"),
        (b"id,body\n1,x\n", "in.csv: no column 'text'; columns found: 'id', 'body' (choose one with --text-column)"),
        (b"id,text\n1,ok\n2,caf\xe9\n", "in.csv: row 2 (line 3) is not valid utf-8"),
        (
            b"id,text\n1,ok\n2, \n3,\n4,fine\n",
            "in.csv: 2 row(s) with an empty text (nothing but whitespace, control or format characters): row 2, 3 ",
        ),
        # Nothing visible: NUL, zero-width space, BOM, NBSP, line separator; the server calls them empty too.
        (
            "id,text\n1,ok\n2,\x00\n3,\u200b\n4,\ufeff\n5,\u00a0\n6,\u2028\n7,fine\n".encode(),
            "in.csv: 5 row(s) with an empty text (nothing but whitespace, control or format characters): "
            "row 2, 3, 4, 5, 6 ",
        ),
        (b"id,text\nx1,Shares rose, but the bank warned\n", "in.csv: row 1 has 3 fields but the header has 2 (line 2)"),
        (b"id,text,id,text\n1,a,2,b\n", "in.csv: the header names column 'id' twice (columns 1 and 3)"),
        (b"id,text\n,hello\n", "in.csv: 1 row(s) with an empty id (column 'id'): row 1"),
        (b"id,text\na,one\n,two\nc,three\n,four\n", "in.csv: 2 row(s) with an empty id (column 'id'): row 2, 4"),
    ],
)
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
    (tmp_path / "folder").mkdir()
    for command in ("predict", "evaluate"):
        result = run(command, tmp_path / "folder", "--url", _closed_port_url())
        assert result.exit_code == 2 and "folder' is a directory" in result.stderr, result.output


def test_tab_separated_input_needs_the_delimiter_option(run, tmp_path):
    path = _csv(tmp_path, b"id\ttext\n1\thello\n")
    result = run("predict", path, "--url", _closed_port_url(), "--retries", 0, "--out-dir", tmp_path / "out")
    assert result.exit_code == 2 and "no column 'text'" in result.stderr and "--delimiter" in result.stderr
    # With it, the file passes its checks and the run goes on to the (closed) server.
    for value in ("tab", "\\t", "\t"):
        result = run(
            "predict",
            path,
            "--delimiter",
            value,
            "--url",
            _closed_port_url(),
            "--retries",
            0,
            "--out-dir",
            tmp_path / "out",
        )
        assert result.exit_code == 1 and "unavailable" in result.stderr, (value, result.output)


def test_a_50_mb_field_is_refused_while_read_in_bounded_memory(tmp_path):
    # The repro: `id,text\nb1,ok\nb2,"<50 MB of x>"` held the whole field (467 MB max RSS).
    path = tmp_path / "big.csv"
    with open(path, "wb") as handle:
        handle.write(b'id,text\nb1,ok\nb2,"')
        for _ in range(50):
            handle.write(b"x" * (1 << 20))
        handle.write(b'"\n')
    command = [
        sys.executable,
        "-m",
        "mtl_client.cli",
        "predict",
        str(path),
        "--url",
        _closed_port_url(),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    # The CLI is started by a small Python, not by pytest: a child's peak RSS counts its parent's pages
    # until exec, and pytest's would swamp the number.
    measure = (
        "import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE); "
        "err = p.stderr.read().decode(); _, status, usage = os.wait4(p.pid, 0); "
        "print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss, err]))"
    )
    done = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=120)
    code, max_rss_kib, stderr = json.loads(done.stdout)
    assert code == 2, stderr
    assert stderr.startswith(f"mtl-client: error: {path}: row 2 (from line 3) is too large: over ")
    # The process stays far below the 50 MB field (and the 300 MB bound of benchmarks/client_rss.py).
    assert max_rss_kib < 150 * 1024, max_rss_kib
    assert not (tmp_path / "out").exists()


def test_plot_without_matplotlib_is_a_clear_usage_error(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the plot extra sees
    path = _csv(tmp_path, b"text,topic\nhello,tech\n")
    result = run("evaluate", path, "--plot", tmp_path / "plot.png", "--url", _closed_port_url())
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "mtl-client: error: --plot needs matplotlib, which mtl-client installs only as an extra: "
        "pip install 'mtl-client[plot]'\n"
    )
    assert not (tmp_path / "plot.png").exists()


def test_unreachable_server_exits_1_quickly(run, tmp_path):
    path = _csv(tmp_path, b"id,text\n1,hello\n")
    started = time.monotonic()
    result = run(
        "predict", path, "--url", _closed_port_url(), "--retries", 0, "--timeout", 2, "--out-dir", tmp_path / "out"
    )
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
        (
            ["predict", path, "--url", "http://localhost:8000"],
            "Invalid value for '--url': http://localhost:8000 is an HTTP url",
        ),
        (["predict", path, "--encoding", "klingon"], "unknown encoding 'klingon'"),
        (["predict", path, "--batch-size", 0], "Invalid value for '--batch-size'"),
        (["predict", path, "--delimiter", ";;"], "Invalid value for '--delimiter': ';;' is not one character"),
        (["evaluate", path, "--delimiter", '"'], "Invalid value for '--delimiter'"),
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
