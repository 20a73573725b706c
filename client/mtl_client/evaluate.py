"""`mtl-client evaluate`: score a labelled CSV through the server and report each task's metrics.

A column named like one of the server's tasks holds that task's true labels; an empty cell leaves the
row unlabelled for that task. The numbers are `metrics.classification_report`'s, the same as the
build's model card.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np

from .contract import ModelContract, TaskSpec
from .csv_input import CsvInput, InputFileError, InputRow
from .metrics import ECE_BINS, classification_report
from .predictions import Prediction


def label_tasks(source: CsvInput, contract: ModelContract) -> tuple[TaskSpec, ...]:
    """The server's tasks that have a column in the file (in the server's order); none is an error."""
    tasks = tuple(task for task in contract.tasks if task.name in source.header)
    if not tasks:
        listed = "; ".join(f"{t.name} ({', '.join(t.labels)})" for t in contract.tasks)
        raise InputFileError(
            f"{source.name}: no label column: name a column after a task of model '{contract.model}' "
            f"(its tasks: {listed}); columns found: {source.columns_text}"
        )
    source.select_columns([task.name for task in tasks])
    return tasks


class LabelChecker:
    """Turns each row's label cells into label indices (None: unlabelled), remembering the bad ones."""

    def __init__(self, name: str, tasks: Sequence[TaskSpec], shown: int = 5):
        self.name = name
        self.tasks = tuple(tasks)
        self._index = [{label: k for k, label in enumerate(task.labels)} for task in self.tasks]
        self.shown = shown
        self.bad_count = 0
        self.bad_rows: list[int] = []
        self.first_bad: tuple[int, TaskSpec, str] | None = None

    def labels(self, row: InputRow) -> tuple[int | None, ...]:
        found = []
        for task, index, cell in zip(self.tasks, self._index, row.extra, strict=True):
            value = cell.strip()
            if not value:
                found.append(None)
                continue
            position = index.get(value)
            if position is None:
                self.bad_count += 1
                if len(self.bad_rows) < self.shown and row.number not in self.bad_rows:
                    self.bad_rows.append(row.number)
                if self.first_bad is None:
                    self.first_bad = (row.number, task, cell)
            found.append(position)
        return tuple(found)

    @property
    def failed(self) -> bool:
        return self.bad_count > 0

    def error(self) -> InputFileError:
        number, task, value = self.first_bad
        message = (
            f"{self.name}: row {number}, column {task.name!r}: {value!r} is not a label of task "
            f"{task.name!r} (valid labels: {', '.join(task.labels)}; an empty cell leaves the row unlabelled)"
        )
        if self.bad_count > 1:
            listed = ", ".join(map(str, self.bad_rows)) + (", ..." if self.bad_count > len(self.bad_rows) else "")
            message += f"; {self.bad_count} unknown labels in all (rows {listed})"
        return InputFileError(
            message,
            index=number - 1,
            indices=[r - 1 for r in self.bad_rows],
            count=self.bad_count,
            reason=f"unknown label {value!r} for task {task.name!r}",
        )


class Evaluation:
    """True label indices and predicted probabilities per task, kept compactly (8 bytes per number)."""

    def __init__(self, tasks: Sequence[TaskSpec]):
        self.tasks = tuple(tasks)
        self.truth = {task.name: array.array("q") for task in self.tasks}
        self.probabilities = {task.name: array.array("d") for task in self.tasks}
        self.rows = 0  # data rows read
        self.scored = 0  # rows sent to the server (labelled for at least one task)
        self.skipped_empty = 0  # rows with an empty text, not sent (--allow-empty)

    @staticmethod
    def wanted(labels: tuple[int | None, ...]) -> bool:
        return any(label is not None for label in labels)

    def add(self, labels: tuple[int | None, ...], prediction: Prediction | None, empty_text: bool = False) -> None:
        self.rows += 1
        if prediction is None:
            self.skipped_empty += int(empty_text and self.wanted(labels))
            return
        self.scored += 1
        for task, label in zip(self.tasks, labels, strict=True):
            if label is None:
                continue
            self.truth[task.name].append(label)
            probabilities = prediction[task.name].probabilities
            self.probabilities[task.name].extend(probabilities[name] for name in task.labels)

    def report(self, **about) -> dict:
        tasks = {}
        for task in self.tasks:
            truth = np.frombuffer(self.truth[task.name], dtype=np.int64) if self.truth[task.name] else np.zeros(0, int)
            values = (
                np.frombuffer(self.probabilities[task.name], dtype=np.float64)
                if self.probabilities[task.name]
                else np.zeros(0)
            )
            tasks[task.name] = classification_report(truth, values.reshape(len(truth), len(task.labels)), task.labels)
        return {
            **about,
            "rows": self.rows,
            "rows_scored": self.scored,
            "rows_skipped_empty_text": self.skipped_empty,
            "ece_bins": ECE_BINS,
            "tasks": tasks,
        }


def _table(rows: list[list[str]], right_from: int = 1) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(w) if c >= right_from else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def format_report(report: dict) -> str:
    """The report as plain text: per task its summary line, per-class table and confusion matrix."""
    lines = [
        f"{report.get('input', 'input')}: {report['rows']:,} rows, {report['rows_scored']:,} scored by model "
        f"'{report.get('model', '?')}' at {report.get('url', '?')}"
    ]
    if report.get("rows_skipped_empty_text"):
        lines[0] += f" ({report['rows_skipped_empty_text']:,} labelled rows with an empty text skipped)"
    for name, result in report["tasks"].items():
        lines.append("")
        if not result["rows"]:
            lines.append(f"{name}: no labelled rows")
            continue
        lines.append(f"{name}: {result['rows']:,} labelled rows")
        lines.append(
            f"  accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
            f"macro-recall {result['macro_recall']:.4f}   ECE {result['ece']:.4f} "
            f"({report['ece_bins']} bins, top label)"
        )
        per_class = [["label", "precision", "recall", "f1", "support"]]
        for label in result["labels"]:
            c = result["per_class"][label]
            per_class.append([label, *(f"{c[key]:.4f}" for key in ("precision", "recall", "f1")), f"{c['support']}"])
        lines.extend(_table(per_class))
        lines.append("  confusion matrix (rows: true label, columns: predicted label)")
        matrix = [["", *result["labels"]]]
        matrix += [
            [label, *map(str, counts)]
            for label, counts in zip(result["labels"], result["confusion_matrix"], strict=True)
        ]
        lines.extend("  " + line for line in _table(matrix))
    return "\n".join(lines)
