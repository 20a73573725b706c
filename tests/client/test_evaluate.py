"""`mtl-client evaluate`: metrics against hand-computed cases, label checks, --json and --plot, and a real run."""

import csv
import io
import json
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from mtl_client import ModelContract, MultiTaskClient, Prediction, TaskPrediction, TaskSpec
from mtl_client.cli import main
from mtl_client.csv_input import CsvInput, InputFileError, InputRow
from mtl_client.evaluate import Evaluation, LabelChecker, format_report, label_tasks
from mtl_client.metrics import classification_report
from mtl_client.plot import write_plot

LETTERS = TaskSpec("letters", ("a", "b", "c"))
MOOD = TaskSpec("mood", ("down", "up"))


def _prediction(**tasks) -> Prediction:
    results = {}
    for spec in (LETTERS, MOOD):
        if spec.name in tasks:
            probabilities = dict(zip(spec.labels, tasks[spec.name], strict=True))
            best = max(probabilities, key=probabilities.get)
            results[spec.name] = TaskPrediction(best, probabilities[best], probabilities)
    return Prediction(text="t", tasks=results)


# Six rows by hand. Predicted (argmax): a, b, b, b, c, a; true: a, a, b, b, c, c.
CASE = [
    (0, [0.72, 0.18, 0.10]),  # right, confidence 0.72: bin (0.7, 0.8]
    (0, [0.35, 0.55, 0.10]),  # wrong (b), 0.55: bin (0.5, 0.6]
    (1, [0.05, 0.85, 0.10]),  # right, 0.85: bin (0.8, 0.9]
    (1, [0.25, 0.65, 0.10]),  # right, 0.65: bin (0.6, 0.7]
    (2, [0.18, 0.20, 0.62]),  # right, 0.62: bin (0.6, 0.7]
    (2, [0.93, 0.02, 0.05]),  # wrong (a), 0.93: bin (0.9, 1.0]
]


def test_metrics_of_a_hand_computed_case():
    evaluation = Evaluation((LETTERS,))
    for truth, probabilities in CASE:
        evaluation.add((truth,), _prediction(letters=probabilities))
    result = evaluation.report()["tasks"]["letters"]
    # Confusion (rows true, columns predicted): a -> a 1, b 1; b -> b 2; c -> a 1, c 1.
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result["rows"] == 6 and result["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    # precision = right / predicted as the label; recall = right / truly the label.
    expected = {"a": (1 / 2, 1 / 2), "b": (2 / 3, 2 / 2), "c": (1 / 1, 1 / 2)}
    for label, (precision, recall) in expected.items():
        got = result["per_class"][label]
        assert got["precision"] == pytest.approx(precision, abs=1e-4)
        assert got["recall"] == pytest.approx(recall, abs=1e-4)
        assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-4)
        assert got["support"] == 2
    # F1: a 0.5, b 0.8, c 2/3.
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-4)
    assert result["macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-4)
    # ECE over the top label's probability, 10 bins:
    #   (0.5,0.6] 1 row, accuracy 0, confidence 0.55 -> 0.55;  (0.6,0.7] 2 rows, accuracy 1, confidence 0.635 -> 0.365
    #   (0.7,0.8] 1 row, 1 vs 0.72 -> 0.28;  (0.8,0.9] 1 vs 0.85 -> 0.15;  (0.9,1] 0 vs 0.93 -> 0.93
    assert result["ece"] == pytest.approx((0.55 + 2 * 0.365 + 0.28 + 0.15 + 0.93) / 6, abs=1e-4)  # 0.44
    bins = {round(b["low"], 1): (b["rows"], b["accuracy"]) for b in result["reliability"] if b["rows"]}
    assert bins == {0.5: (1, 0.0), 0.6: (2, 1.0), 0.7: (1, 1.0), 0.8: (1, 1.0), 0.9: (1, 0.0)}


def test_unlabelled_cells_and_a_label_nobody_has():
    # letters: 3 labelled rows (true a, a, b; predicted a, b, b): c neither true nor predicted is left out of the
    # macro averages. mood: labelled on 2 rows only.
    evaluation = Evaluation((LETTERS, MOOD))
    rows = [
        ((0, 1), dict(letters=[0.9, 0.05, 0.05], mood=[0.2, 0.8])),
        ((0, None), dict(letters=[0.3, 0.6, 0.1], mood=[0.6, 0.4])),
        ((1, 0), dict(letters=[0.1, 0.8, 0.1], mood=[0.3, 0.7])),
        ((None, None), None),
    ]
    for labels, probabilities in rows:
        evaluation.add(labels, _prediction(**probabilities) if probabilities else None)
    report = evaluation.report(input="x.csv")
    assert (report["rows"], report["rows_scored"]) == (4, 3)
    letters, mood = report["tasks"]["letters"], report["tasks"]["mood"]
    assert letters["rows"] == 3 and letters["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert letters["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a: precision 1/1, recall 1/2, F1 2/3; b: precision 1/2, recall 1/1, F1 2/3.
    assert letters["macro_f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert letters["macro_recall"] == pytest.approx(0.75, abs=1e-4)
    # mood: true up, down; predicted up, up.
    assert mood["rows"] == 2 and mood["confusion_matrix"] == [[0, 1], [0, 1]]
    assert mood["accuracy"] == 0.5 and mood["macro_recall"] == pytest.approx(0.5, abs=1e-4)
    # The same numbers as metrics.classification_report on the labelled rows alone.
    direct = classification_report(
        [0, 0, 1], np.array([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]]), LETTERS.labels
    )
    assert letters == direct
    text = format_report(report)
    assert "letters: 3 labelled rows" in text and "mood: 2 labelled rows" in text
    assert "accuracy 0.6667   macro-F1 0.6667   macro-recall 0.7500" in text


def _contract(tasks=(LETTERS, MOOD)) -> ModelContract:
    return ModelContract(
        model="demo", input_name="TEXT", tasks=tuple(tasks), max_batch_size=8, truncated_output="TRUNCATED"
    )


def test_label_columns_are_the_servers_tasks_found_in_the_header():
    source = CsvInput(io.BytesIO(b"note,mood,text,letters\nx,up,hi,b\n"), "in.csv")
    assert label_tasks(source, _contract()) == (LETTERS, MOOD)  # the server's order, not the file's
    assert [row.extra for row in source] == [("b", "up")]
    with pytest.raises(InputFileError) as info:
        label_tasks(CsvInput(io.BytesIO(b"text,label\nhi,b\n"), "in.csv"), _contract())
    assert str(info.value) == (
        "in.csv: no label column: name a column after a task of model 'demo' "
        "(its tasks: letters (a, b, c); mood (down, up)); columns found: 'text', 'label'"
    )


def test_a_label_the_server_does_not_know_names_row_column_and_valid_labels():
    check = LabelChecker("in.csv", (LETTERS, MOOD))
    assert check.labels(InputRow(1, 1, "t", ("c", ""))) == (2, None)
    assert check.labels(InputRow(2, 2, "t", (" a ", "up"))) == (0, 1)  # surrounding spaces are not part of a label
    assert not check.failed
    check.labels(InputRow(3, 3, "t", ("A", "up")))
    check.labels(InputRow(4, 4, "t", ("b", "sideways")))
    assert check.failed
    error = check.error()
    assert str(error) == (
        "in.csv: row 3, column 'letters': 'A' is not a label of task 'letters' (valid labels: "
        "a, b, c; an empty cell leaves the row unlabelled); 2 unknown labels in all (rows 3, 4)"
    )
    assert error.index == 2 and error.count == 2


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # the header chunk is intact
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path):
    evaluation = Evaluation((LETTERS, MOOD))
    for truth, probabilities in CASE:
        evaluation.add((truth, truth % 2), _prediction(letters=probabilities, mood=[0.3, 0.7]))
    path = write_plot(evaluation.report(input="x.csv", model="demo"), tmp_path / "plots" / "report.png")
    width, height = _png_size(path)
    assert width > 0 and height > 0 and path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["report.png"]  # no temp file left


# -- against the real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(test_config_path, test_config):
    """The test project's validation split: text plus one label column per task (some cells empty)."""
    path = test_config_path.parent / "validation.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 200 and all(task.name in rows[0] for task in test_config.tasks)
    return path, rows


def _cli(server, *args, input=None):
    return CliRunner().invoke(main, [*map(str, args), "--url", server.grpc_url], input=input)


def _expected(server, rows, test_config) -> dict:
    """Each task's report from the server's own predictions, computed here without mtl-client evaluate."""
    text_column = test_config.data.text_column
    with MultiTaskClient(server.grpc_url, model=test_config.serving.model_name) as client:
        predictions = client.predict([row[text_column] for row in rows])
    expected = {}
    for task in test_config.tasks:
        pairs = [
            (list(task.labels).index(row[task.name]), prediction[task.name].probabilities)
            for row, prediction in zip(rows, predictions, strict=True)
            if row[task.name]
        ]
        probabilities = np.array([[p[label] for label in task.labels] for _, p in pairs])
        truth = [t for t, _ in pairs]
        matrix = np.zeros((len(task.labels), len(task.labels)), dtype=int)
        for t, predicted in zip(truth, probabilities.argmax(axis=1), strict=True):
            matrix[t, predicted] += 1
        expected[task.name] = {
            "rows": len(pairs),
            "accuracy": float(np.trace(matrix) / len(pairs)),
            "confusion_matrix": matrix.tolist(),
            "report": classification_report(truth, probabilities, task.labels),
        }
    return expected


@pytest.mark.e2e
def test_evaluate_the_validation_split_through_the_server(triton_server, labelled, test_config, tmp_path):
    path, rows = labelled
    expected = _expected(triton_server, rows, test_config)
    result = _cli(
        triton_server,
        "evaluate",
        path,
        "--json",
        "--plot",
        tmp_path / "report.png",
        "--batch-size",
        32,
        "--model",
        test_config.serving.model_name,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == len(rows) and report["model"] == test_config.serving.model_name
    assert list(report["tasks"]) == [task.name for task in test_config.tasks]
    for task in test_config.tasks:
        got, want = report["tasks"][task.name], expected[task.name]
        assert got["rows"] == want["rows"] and got["labels"] == list(task.labels)
        assert got["confusion_matrix"] == want["confusion_matrix"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-4)
        for key in ("macro_f1", "macro_recall", "ece"):
            assert got[key] == pytest.approx(want["report"][key], abs=2e-3), key
        assert set(got["per_class"]) == set(task.labels) and len(got["reliability"]) == report["ece_bins"] == 10
    assert result.stderr.strip() == f"wrote {tmp_path / 'report.png'}"
    assert min(_png_size(tmp_path / "report.png")) > 0

    # The table, from stdin (read once, checked as it streams), says the same.
    table = _cli(triton_server, "evaluate", "-", input=path.read_bytes())
    assert table.exit_code == 0, table.output
    for task in test_config.tasks:
        got = report["tasks"][task.name]
        assert f"{task.name}: {got['rows']:,} labelled rows" in table.stdout
        assert f"accuracy {got['accuracy']:.4f}" in table.stdout


@pytest.mark.e2e
def test_evaluate_one_task_from_a_tsv(triton_server, labelled, test_config, tmp_path):
    _, rows = labelled
    task = test_config.tasks[-1]
    text_column = test_config.data.text_column
    source = tmp_path / "one.tsv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["comment", text_column, task.name])
        writer.writerows(["ignored", row[text_column], row[task.name]] for row in rows[:40])
    result = _cli(triton_server, "evaluate", source, "--delimiter", "tab", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["tasks"]) == [task.name]
    assert report["tasks"][task.name]["rows"] == sum(1 for row in rows[:40] if row[task.name])


@pytest.mark.e2e
def test_evaluate_refuses_bad_labels_and_files(triton_server, test_config, tmp_path):
    first, second = test_config.tasks[0], test_config.tasks[-1]
    cases = {
        f"text,{first.name}\nok text,{first.labels[0]}\nanother text,not-a-label\n": (
            f"row 2, column '{first.name}': 'not-a-label' is not a label of task '{first.name}' "
            f"(valid labels: {', '.join(first.labels)};"
        ),
        f"text,{second.name}\na,{second.labels[0]}\nb,{second.labels[0].upper()}x\nc,??\n": (
            "2 unknown labels in all (rows 2, 3)"
        ),
        "text,label\nsome text,x\n": (
            f"no label column: name a column after a task of model '{test_config.serving.model_name}' (its tasks: "
            + "; ".join(f"{t.name} ({', '.join(t.labels)})" for t in test_config.tasks)
        ),
        f"text,{first.name}\nShares rose, but the bank warned,{first.labels[0]}\n": (
            "row 1 has 3 fields but the header has 2 (line 2)"
        ),
        f"text,{first.name}\n\u200b,{first.labels[0]}\n": "1 row(s) with an empty text",
    }
    for data, message in cases.items():
        source = tmp_path / "bad.csv"
        source.write_text(data, encoding="utf-8")
        for target, given in ((source, None), ("-", data)):  # a file (checked first) and stdin (as it streams)
            result = _cli(triton_server, "evaluate", target, "--plot", tmp_path / "p.png", input=given)
            assert result.exit_code == 2, (data, result.output)
            assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert result.stdout == "" and not (tmp_path / "p.png").exists()
