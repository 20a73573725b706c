"""Labelled CSV → texts plus one label-index array per task (-1 where a row has no label for it)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TaskConfig
from .errors import BuildError


class DataError(BuildError):
    """A labelled data file is missing or holds a bad row."""


@dataclass
class LabelledData:
    texts: list[str]
    # task name → label index per row, -1 when the row is unlabelled for that task
    labels: dict[str, np.ndarray]
    # each row's register (kind of text) when the file has the register column, else None
    registers: list[str] | None = None

    def labelled_count(self, task: str) -> int:
        return int((self.labels[task] >= 0).sum())


def read_labelled_csv(
    path: Path, tasks: list[TaskConfig], text_column: str = "text", register_column: str | None = "register"
) -> LabelledData:
    if not path.is_file():
        raise DataError(f"{path}: labelled data file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if text_column not in columns:
            raise DataError(f"{path}: no {text_column!r} column; columns found: {columns}")
        has_registers = bool(register_column) and register_column in columns
        texts: list[str] = []
        registers: list[str] = []
        labels: dict[str, list[int]] = {task.name: [] for task in tasks}
        index_of = {task.name: {label: i for i, label in enumerate(task.labels)} for task in tasks}
        # Row numbers count the header as line 1, as a spreadsheet shows them.
        for line, row in enumerate(reader, start=2):
            if None in row:  # more fields than the header: an unquoted comma, most likely
                raise DataError(
                    f"{path}, row {line}: {len(columns) + len(row[None])} fields but the header has "
                    f"{len(columns)} (quote texts that contain commas)"
                )
            text = (row.get(text_column) or "").strip()
            if not text:
                raise DataError(f"{path}, row {line}, column {text_column!r}: empty text")
            texts.append(text)
            if has_registers:
                registers.append((row.get(register_column) or "").strip() or "unknown")
            for task in tasks:
                value = (row.get(task.name) or "").strip()
                if not value:
                    labels[task.name].append(-1)
                elif value in index_of[task.name]:
                    labels[task.name].append(index_of[task.name][value])
                else:
                    raise DataError(
                        f"{path}, row {line}, column {task.name!r}: unknown label {value!r}; valid: {list(task.labels)}"
                    )
    if not texts:
        raise DataError(f"{path}: no data rows")
    return LabelledData(
        texts,
        {name: np.array(values, dtype=np.int64) for name, values in labels.items()},
        registers if has_registers else None,
    )
