"""Per-task output files written atomically: temp files in the output folder, renamed only on success."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

from .contract import TaskSpec
from .predictions import TaskPrediction

FORMATS = ("csv", "jsonl")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _number(value: float) -> str:
    return f"{value:.6f}"


class _TaskFile:
    """One task's rows: id, text, label, score, [prob_<label>...], truncated."""

    def __init__(self, handle: TextIO, task: TaskSpec, fmt: str, probs: bool):
        self.handle, self.task, self.fmt, self.probs = handle, task, fmt, probs
        self.columns = ["id", "text", "label", "score"]
        if probs:
            self.columns += [f"prob_{label}" for label in task.labels]
        self.columns.append("truncated")
        if fmt == "csv":
            # QUOTE_MINIMAL only quotes the line terminator's own characters: with "\n" a bare CR in a text
            # would go out unquoted and split the row when read back, so keep the default "\r\n".
            self.csv = csv.writer(handle)
            self.csv.writerow(self.columns)

    def write(self, row_id, text: str, result: TaskPrediction | None, truncated: bool | None) -> None:
        if self.fmt == "csv":
            if result is None:  # an empty text written unscored (--allow-empty)
                values = [row_id, text, "", ""] + ([""] * len(self.task.labels) if self.probs else []) + [""]
            else:
                values = [row_id, text, result.label, _number(result.score)]
                if self.probs:
                    values += [_number(result.probabilities[label]) for label in self.task.labels]
                values.append("true" if truncated else "false")
            self.csv.writerow(values)
            return
        record = {"id": row_id, "text": text,
                  "label": result.label if result else None,
                  "score": round(result.score, 6) if result else None}
        if self.probs:
            for label in self.task.labels:
                record[f"prob_{label}"] = round(result.probabilities[label], 6) if result else None
        record["truncated"] = truncated if result else None
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")


class AtomicOutputs:
    """`with AtomicOutputs(out_dir, {task: name}, tasks, "csv", probs) as out: out.write(...); out.commit()`.

    Rows go to hidden temp files beside the final ones. `commit()` renames them all into place; leaving
    the block without a commit (an error, Ctrl-C) deletes them, so old outputs are never clobbered by
    a failed run and no partial file is left behind.
    """

    def __init__(self, out_dir: str | Path, names: dict[str, str], tasks: tuple[TaskSpec, ...], fmt: str = "csv",
                 probs: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out_dir = Path(out_dir)
        self.names = names
        self.tasks = tasks
        self.fmt, self.probs = fmt, probs
        self.paths = {task: self.out_dir / name for task, name in names.items()}
        self._temps: dict[str, Path] = {}
        self._files: dict[str, _TaskFile] = {}
        self._created_dir = False
        self.committed = False

    def __enter__(self) -> "AtomicOutputs":
        if not self.out_dir.is_dir():
            self.out_dir.mkdir(parents=True)
            self._created_dir = True
        try:
            for task in self.tasks:
                fd, temp = tempfile.mkstemp(prefix=f".{self.names[task.name]}.", suffix=".tmp", dir=self.out_dir)
                self._temps[task.name] = Path(temp)
                handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
                self._files[task.name] = _TaskFile(handle, task, self.fmt, self.probs)
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, row_id, text: str, results: dict[str, TaskPrediction] | None, truncated: bool | None) -> None:
        for name, task_file in self._files.items():
            task_file.write(row_id, text, results[name] if results else None, truncated)

    def commit(self) -> list[Path]:
        for task_file in self._files.values():
            task_file.handle.flush()
            os.fsync(task_file.handle.fileno())
            task_file.handle.close()
        # mkstemp makes 0600 files; outputs get the usual permissions.
        mode = 0o666 & ~_umask()
        for name, temp in self._temps.items():
            os.chmod(temp, mode)
            os.replace(temp, self.paths[name])
        self._temps.clear()
        self.committed = True
        return list(self.paths.values())

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self._abort()

    def _abort(self) -> None:
        for task_file in self._files.values():
            try:
                task_file.handle.close()
            except OSError:
                pass
        for temp in self._temps.values():
            temp.unlink(missing_ok=True)
        self._temps.clear()
        if self._created_dir:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass
