"""`mtl-client` through CliRunner against the real Triton server (session fixture `triton_server`)."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner

from mtl_client.cli import main

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(triton_server, test_config):
    """Tasks, labels and file template straight from the server (read without mtl_client), which must be
    those of the config the repository was built from."""
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        config = client.get_model_config(test_config.serving.model_name, as_json=True)["config"]
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    tasks = {t["name"]: t["labels"] for t in json.loads(parameters["tasks"])}
    assert tasks == {task.name: list(task.labels) for task in test_config.tasks}
    assert parameters["output_filename"] == test_config.serving.output_filename
    return tasks, parameters["output_filename"]


@pytest.fixture(scope="module")
def sample_rows():
    with open(ROOT / "data" / "sample.csv", newline="", encoding="utf-8") as handle:
        return [(row["id"], row["text"]) for row in csv.DictReader(handle)][:12]


def _cli(server, *args, input=None):
    return CliRunner().invoke(main, [*map(str, args), "--url", server.grpc_url], input=input)


def _write_csv(path: Path, rows, header=("id", "text"), bom=False) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    return path


def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _files(out_dir: Path, served, ext="csv") -> dict[str, Path]:
    tasks, template = served
    return {task: (out_dir / template.replace("{task}", task)).with_suffix(f".{ext}") for task in tasks}


def test_predict_writes_one_file_per_task_in_input_order(triton_server, served, sample_rows, tmp_path):
    # Quoted commas, an embedded newline and non-ASCII text, in a file with a UTF-8 BOM.
    rows = [*sample_rows, ("q1", 'He said, "the new GPU, finally!"\nThen he bought two.'), ("q2", "Café prices ↑ 5%")]
    source = _write_csv(tmp_path / "in.csv", rows, bom=True)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out", "--batch-size", 4)
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{len(rows)} rows in ") and last.endswith(" rows/s)")
    tasks, _ = served
    files = _files(tmp_path / "out", served)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in files.values())
    for task, path in files.items():
        written = _read(path)
        assert list(written[0]) == ["id", "text", "label", "score", "truncated"]
        assert [(r["id"], r["text"]) for r in written] == rows
        assert all(r["label"] in tasks[task] for r in written)
        assert all(0 < float(r["score"]) <= 1 and r["truncated"] == "false" for r in written)


def test_probs_columns_sum_to_one_and_agree_with_label(triton_server, served, sample_rows, tmp_path):
    source = _write_csv(tmp_path / "in.csv", sample_rows)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path, "--probs")
    assert result.exit_code == 0, result.output
    tasks, _ = served
    for task, path in _files(tmp_path, served).items():
        for row in _read(path):
            probs = {label: float(row[f"prob_{label}"]) for label in tasks[task]}
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
            assert row["label"] == max(probs, key=probs.get)
            assert float(row["score"]) == pytest.approx(max(probs.values()), abs=1e-6)


def test_jsonl_format(triton_server, served, sample_rows, tmp_path):
    source = _write_csv(tmp_path / "in.csv", sample_rows)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out", "--format", "jsonl", "--probs")
    assert result.exit_code == 0, result.output
    tasks, _ = served
    for task, path in _files(tmp_path / "out", served, "jsonl").items():
        records = _read(path)
        assert [(r["id"], r["text"]) for r in records] == sample_rows
        assert all(r["label"] in tasks[task] and isinstance(r["truncated"], bool) for r in records)
        assert all(
            set(r) == {"id", "text", "label", "score", "truncated", *(f"prob_{label}" for label in tasks[task])}
            for r in records
        )


def test_row_numbers_as_ids_long_texts_sent_and_flagged(triton_server, served, tmp_path):
    long_text = "The market rallied again today as investors cheered the results. " * 1600  # ~105,000 characters
    rows = [("Short and clear: the film was wonderful",), (long_text,), ("Battery life is terrible",)]
    source = _write_csv(tmp_path / "in.csv", rows, header=("text",))
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    for path in _files(tmp_path, served).values():
        written = _read(path)
        assert [r["id"] for r in written] == ["1", "2", "3"]
        assert [r["truncated"] for r in written] == ["false", "true", "false"]
        assert written[1]["text"] == long_text


def test_many_small_concurrent_requests_keep_order(triton_server, served, sample_rows, tmp_path):
    rows = [(f"r{i}", f"{text} ({i})") for i, (_, text) in enumerate(sample_rows * 5)]
    source = _write_csv(tmp_path / "in.csv", rows)
    outputs = {}
    for name, options in (
        ("one", ["--batch-size", 64, "--concurrency", 1]),
        ("many", ["--batch-size", 3, "--concurrency", 4]),
    ):
        result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / name, *options)
        assert result.exit_code == 0, result.output
        outputs[name] = {task: _read(path) for task, path in _files(tmp_path / name, served).items()}
    for task in outputs["one"]:
        assert [r["id"] for r in outputs["many"][task]] == [r for r, _ in rows]
        assert [r["label"] for r in outputs["many"][task]] == [r["label"] for r in outputs["one"][task]]


def test_empty_texts_fail_listing_rows_or_are_written_unscored(triton_server, served, tmp_path):
    rows = [("a", "Stocks fell sharply"), ("b", "   "), ("c", "A lovely concert"), ("d", "")]
    source = _write_csv(tmp_path / "in.csv", rows)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert (
        "2 row(s) with an empty text (nothing but whitespace, control or format characters): row 2, 4" in result.stderr
    )
    assert not (tmp_path / "out").exists()

    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out", "--allow-empty")
    assert result.exit_code == 0, result.output
    for path in _files(tmp_path / "out", served).values():
        written = _read(path)
        assert [r["id"] for r in written] == ["a", "b", "c", "d"]
        assert [r["label"] == "" for r in written] == [False, True, False, True]
        assert written[1]["text"] == "   " and written[1]["score"] == ""


def test_streamed_stdin_with_a_late_bad_row_leaves_old_outputs_alone(triton_server, served, sample_rows, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    files = _files(out_dir, served)
    for path in files.values():
        path.write_text("from an earlier run\n")
    rows = [(f"r{i}", text) for i, (_, text) in enumerate(sample_rows * 2)] + [("late", " ")]
    data = _write_csv(tmp_path / "in.csv", rows).read_bytes()
    result = _cli(triton_server, "predict", "-", "--out-dir", out_dir, "--batch-size", 2, input=data)
    assert result.exit_code == 2
    assert (
        f"<stdin>: 1 row(s) with an empty text (nothing but whitespace, control or format characters): row {len(rows)}"
    ) in result.stderr
    assert sorted(out_dir.iterdir()) == sorted(files.values())  # no temp file left
    assert all(p.read_text() == "from an earlier run\n" for p in files.values())

    # The same data without the bad row streams through stdin fine.
    data = _write_csv(tmp_path / "ok.csv", rows[:-1]).read_bytes()
    result = _cli(triton_server, "predict", "-", "--out-dir", out_dir, "--batch-size", 2, input=data)
    assert result.exit_code == 0, result.output
    assert all(len(_read(p)) == len(rows) - 1 for p in files.values())


def test_duplicate_ids_warn_but_every_row_is_written(triton_server, served, tmp_path):
    rows = [("x", "The shares jumped"), ("y", "My phone died"), ("x", "Great film")]
    source = _write_csv(tmp_path / "in.csv", rows)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "rows 1 and 3" in result.stderr
    assert all(len(_read(p)) == 3 for p in _files(tmp_path, served).values())


def test_bad_input_through_the_cli(triton_server, tmp_path):
    cases = {
        b"id,body\n1,hello\n": "no column 'text'; columns found: 'id', 'body'",
        b"": "the file is empty",
        b"id,text\n": "header (id, text) but no data rows",
        b"id,text\n1,ok\n2,na\xefve\n": "row 2 (line 3) is not valid utf-8",
    }
    for data, message in cases.items():
        source = tmp_path / "bad.csv"
        source.write_bytes(data)
        result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out")
        assert result.exit_code == 2, (data, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1
        assert not (tmp_path / "out").exists()
    # latin-1 bytes read with the right --encoding.
    source.write_bytes("id,text\n1,naïve café review: loved it\n".encode("latin-1"))
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out", "--encoding", "latin-1")
    assert result.exit_code == 0, result.output


def test_unknown_model_is_a_server_error(triton_server, tmp_path):
    source = _write_csv(tmp_path / "in.csv", [("1", "hello there")])
    result = _cli(triton_server, "predict", source, "--model", "nope", "--out-dir", tmp_path / "out")
    assert result.exit_code == 1 and "does not serve model 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_health_and_info(triton_server, served, test_config):
    model = test_config.serving.model_name
    result = _cli(triton_server, "health")
    assert result.exit_code == 0, result.output
    assert "live yes, ready yes" in result.stdout and f"model {model}: ready yes" in result.stdout
    result = _cli(triton_server, "health", "--model", "nope")
    assert result.exit_code == 1 and "ready no" in result.stdout

    tasks, template = served
    result = _cli(triton_server, "info")
    assert result.exit_code == 0, result.output
    for task, labels in tasks.items():
        assert f"{task}: {', '.join(labels)}" in result.stdout
    assert "max batch size" in result.stdout and "triton" in result.stdout
    details = json.loads(_cli(triton_server, "info", "--json").stdout)
    assert {t["name"]: t["labels"] for t in details["tasks"]} == tasks
    assert details["model"]["output_filename"] == template and details["model"]["max_batch_size"] > 0
    # How the server runs the model: its config's parameters, as the build wrote them.
    serving = test_config.serving
    assert (details["model"]["precision"], details["model"]["runtime"]) == (serving.precision, serving.runtime)
    assert details["model"]["tokens_per_forward"] == serving.tokens_per_forward
    per_forward = "the device's default" if serving.tokens_per_forward == 0 else f"{serving.tokens_per_forward:,}"
    assert (
        f"serving: precision {serving.precision}, runtime {serving.runtime}, device {serving.device}, "
        f"tokens per forward {per_forward}"
    ) in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_temp_file_and_keeps_old_outputs(triton_server, served, tmp_path, signum):
    rows = [(f"r{i}", f"Story {i}: the stock market slid while the new phone sold out") for i in range(3000)]
    source = _write_csv(tmp_path / "in.csv", rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    files = _files(out_dir, served)
    for path in files.values():
        path.write_text("from an earlier run\n")
    command = [
        sys.executable,
        "-m",
        "mtl_client.cli",
        "predict",
        str(source),
        "--url",
        triton_server.grpc_url,
        "--out-dir",
        str(out_dir),
        "--batch-size",
        "8",
        "--concurrency",
        "1",
    ]
    # A shell's background job may inherit an ignored SIGINT; the CLI must see the default.
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        process.send_signal(signum)
        code = process.wait(timeout=30)
    finally:
        process.kill()
    assert code == 130
    assert process.stderr.read().decode().strip() == "mtl-client: error: interrupted; no output written"
    assert sorted(out_dir.iterdir()) == sorted(files.values())
    assert all(p.read_text() == "from an earlier run\n" for p in files.values())


def test_texts_with_nothing_visible_are_empty_like_the_server_says(triton_server, served, tmp_path):
    rows = [
        ("a", "Stocks fell sharply"),
        ("b", "\x00"),
        ("c", "\u200b"),
        ("d", "\ufeff"),
        ("e", " \u00a0 "),
        ("f", "\u2028"),
        ("g", "A lovely concert"),
    ]
    source = _write_csv(tmp_path / "in.csv", rows)
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "5 row(s) with an empty text" in result.stderr and "row 2, 3, 4, 5, 6" in result.stderr
    result = _cli(triton_server, "predict", source, "--out-dir", tmp_path / "out", "--allow-empty")
    assert result.exit_code == 0, result.output
    for path in _files(tmp_path / "out", served).values():
        written = _read(path)
        assert [(r["id"], r["text"]) for r in written] == rows
        assert [r["label"] == "" for r in written] == [False, True, True, True, True, True, False]


def test_a_fifo_is_read_once_like_stdin(triton_server, served, sample_rows, tmp_path):
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    data = _write_csv(tmp_path / "in.csv", sample_rows).read_bytes()

    def feed():
        with open(fifo, "wb") as handle:  # blocks until the CLI opens the FIFO, once
            handle.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = _cli(triton_server, "predict", fifo, "--out-dir", tmp_path / "out")
    writer.join(timeout=30)
    assert result.exit_code == 0, result.output
    for path in _files(tmp_path / "out", served).values():
        assert [(r["id"], r["text"]) for r in _read(path)] == sample_rows


def test_process_substitution_input(triton_server, served, sample_rows, tmp_path):
    # The repro: `mtl-client predict <(...)` said "/dev/fd/63: no such file".
    source = _write_csv(tmp_path / "in.csv", sample_rows)
    script = (
        f'"{sys.executable}" -m mtl_client.cli predict <(cat "{source}") --url {triton_server.grpc_url} '
        f'--out-dir "{tmp_path / "out"}"'
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{len(sample_rows)} rows in ")
    for path in _files(tmp_path / "out", served).values():
        assert [(r["id"], r["text"]) for r in _read(path)] == sample_rows


def test_tab_separated_input(triton_server, served, sample_rows, tmp_path):
    source = tmp_path / "in.tsv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["id", "text"])
        writer.writerows([*sample_rows, ("comma", "Shares rose, but the bank warned")])
    result = _cli(triton_server, "predict", source, "--delimiter", "\\t", "--out-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for path in _files(tmp_path / "out", served).values():
        assert [r["text"] for r in _read(path)][-1] == "Shares rose, but the bank warned"


def test_an_output_that_cannot_be_written_changes_no_output(triton_server, served, sample_rows, tmp_path):
    # The repro: one task's output path is a folder; the other task's file used to be replaced anyway.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    files = list(_files(out_dir, served).values())
    files[0].write_text("from an earlier run\n")
    files[-1].mkdir()
    source = _write_csv(tmp_path / "in.csv", sample_rows)
    result = _cli(triton_server, "predict", source, "--out-dir", out_dir)
    assert result.exit_code == 1
    assert result.stderr == f"mtl-client: error: cannot write {files[-1]}: Is a directory; no output file was changed\n"
    assert files[0].read_text() == "from an earlier run\n"
    assert sorted(out_dir.iterdir()) == sorted(files)
