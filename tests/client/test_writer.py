"""Atomic per-task outputs: renamed into place only on commit, never partial, old outputs kept on failure."""

import csv
import json
import os

import pytest

from mtl_client import TaskPrediction, TaskSpec
from mtl_client.errors import OutputError
from mtl_client.writer import AtomicOutputs

TASKS = (TaskSpec("topic", ("entertainment", "finance", "tech")), TaskSpec("sentiment", ("negative", "positive")))
NAMES = {"topic": "topic_predictions.csv", "sentiment": "sentiment_predictions.csv"}


def _results(topic="finance", sentiment="positive"):
    def one(task, label):
        probs = {name: (0.8 if name == label else 0.2 / (len(task.labels) - 1)) for name in task.labels}
        return TaskPrediction(label, probs[label], probs)

    return {"topic": one(TASKS[0], topic), "sentiment": one(TASKS[1], sentiment)}


def _write_two(out):
    out.write("a1", "Stocks, rallied\nhard", _results(), False)
    out.write(2, "  ", None, None)


def test_commit_writes_every_task_file_and_no_temp(tmp_path):
    with AtomicOutputs(tmp_path, NAMES, TASKS, "csv", probs=True) as out:
        _write_two(out)
        paths = out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentiment_predictions.csv", "topic_predictions.csv"]
    assert paths == [tmp_path / "topic_predictions.csv", tmp_path / "sentiment_predictions.csv"]
    with open(tmp_path / "topic_predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "text", "label", "score", "prob_entertainment", "prob_finance", "prob_tech", "truncated"]
    assert rows[1] == [
        "a1",
        "Stocks, rallied\nhard",
        "finance",
        "0.800000",
        "0.100000",
        "0.800000",
        "0.100000",
        "false",
    ]
    assert rows[2] == ["2", "  ", "", "", "", "", "", ""]
    assert oct(os.stat(paths[0]).st_mode & 0o777) != oct(0o600)


def test_jsonl_records(tmp_path):
    names = {"topic": "topic_predictions.jsonl", "sentiment": "sentiment_predictions.jsonl"}
    with AtomicOutputs(tmp_path, names, TASKS, "jsonl") as out:
        _write_two(out)
        out.commit()
    lines = (tmp_path / "sentiment_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    first, second = map(json.loads, lines)
    assert first == {"id": "a1", "text": "Stocks, rallied\nhard", "label": "positive", "score": 0.8, "truncated": False}
    assert second == {"id": 2, "text": "  ", "label": None, "score": None, "truncated": None}


@pytest.mark.parametrize("failure", [RuntimeError("server went away"), KeyboardInterrupt()])
def test_failure_leaves_nothing_and_keeps_old_outputs(tmp_path, failure):
    (tmp_path / "topic_predictions.csv").write_text("old run\n")
    with pytest.raises(type(failure)), AtomicOutputs(tmp_path, NAMES, TASKS) as out:
        _write_two(out)
        raise failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topic_predictions.csv"]
    assert (tmp_path / "topic_predictions.csv").read_text() == "old run\n"


def test_a_folder_it_made_is_removed_on_failure(tmp_path):
    out_dir = tmp_path / "new" / "outputs"
    with pytest.raises(RuntimeError), AtomicOutputs(out_dir, NAMES, TASKS):
        raise RuntimeError
    assert not out_dir.exists()


def test_no_commit_means_no_output(tmp_path):
    with AtomicOutputs(tmp_path, NAMES, TASKS) as out:
        _write_two(out)
    assert list(tmp_path.iterdir()) == []


def _old_outputs(folder, names=NAMES):
    for name in names.values():
        (folder / name).write_text(f"old {name}\n")


def test_a_folder_in_the_place_of_an_output_fails_before_any_file_is_replaced(tmp_path):
    # The repro: sentiment's output is a folder; topic's file was replaced all the same.
    (tmp_path / "topic_predictions.csv").write_text("old topic\n")
    (tmp_path / "sentiment_predictions.csv").mkdir()
    with pytest.raises(OutputError) as info, AtomicOutputs(tmp_path, NAMES, TASKS) as out:
        _write_two(out)
        out.commit()
    # The real output path, not a temp file.
    assert str(info.value) == (
        f"cannot write {tmp_path / 'sentiment_predictions.csv'}: Is a directory; no output file was changed"
    )
    assert info.value.path == tmp_path / "sentiment_predictions.csv"
    assert (tmp_path / "topic_predictions.csv").read_text() == "old topic\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentiment_predictions.csv", "topic_predictions.csv"]


def test_a_folder_appearing_before_the_commit_is_caught_at_the_commit(tmp_path):
    _old_outputs(tmp_path)
    expected = "sentiment_predictions.csv: Is a directory; no output file was changed"
    with pytest.raises(OutputError, match=expected), AtomicOutputs(tmp_path, NAMES, TASKS) as out:
        _write_two(out)
        (tmp_path / "sentiment_predictions.csv").unlink()
        (tmp_path / "sentiment_predictions.csv").mkdir()
        out.commit()
    assert (tmp_path / "topic_predictions.csv").read_text() == "old topic_predictions.csv\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("had_outputs", [True, False])
def test_a_rename_failing_midway_puts_back_what_was_replaced(tmp_path, monkeypatch, had_outputs):
    if had_outputs:
        _old_outputs(tmp_path)
    real_replace, calls = os.replace, []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OutputError) as info, AtomicOutputs(tmp_path, NAMES, TASKS) as out:
        _write_two(out)
        out.commit()
    monkeypatch.undo()
    assert str(info.value) == (
        f"cannot write {tmp_path / 'sentiment_predictions.csv'}: Permission denied; no output file was changed"
    )
    # topic's file had been replaced: it is back as it was (or gone, when there was none before).
    if had_outputs:
        assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {name: f"old {name}\n" for name in NAMES.values()}
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_second_commit_replaces_both_and_leaves_no_backup(tmp_path):
    for label in ("finance", "tech"):
        with AtomicOutputs(tmp_path, NAMES, TASKS) as out:
            out.write("a1", "text", _results(topic=label), False)
            out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentiment_predictions.csv", "topic_predictions.csv"]
    assert "tech" in (tmp_path / "topic_predictions.csv").read_text()
