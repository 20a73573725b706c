"""Per-task output files written atomically: temp files in the output folder, all renamed into place or none."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TextIO

from .contract import TaskSpec
from .errors import OutputError
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
        record = {
            "id": row_id,
            "text": text,
            "label": result.label if result else None,
            "score": round(result.score, 6) if result else None,
        }
        if self.probs:
            for label in self.task.labels:
                record[f"prob_{label}"] = round(result.probabilities[label], 6) if result else None
        record["truncated"] = truncated if result else None
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")


class AtomicOutputs:
    """`with AtomicOutputs(out_dir, {task: name}, tasks, "csv", probs) as out: out.write(...); out.commit()`.

    Rows go to hidden temp files beside the final ones. `commit()` renames them all into place, or, if
    one rename fails, puts back what the others replaced: every task file is new, or none is. Leaving
    the block without a commit (an error, Ctrl-C) deletes the temp files, so old outputs are never
    clobbered by a failed run and no partial file is left behind.
    """

    def __init__(
        self,
        out_dir: str | Path,
        names: dict[str, str],
        tasks: tuple[TaskSpec, ...],
        fmt: str = "csv",
        probs: bool = False,
    ):
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

    def __enter__(self) -> AtomicOutputs:
        # A folder where an output file goes would fail only at the commit, after all the scoring: say so now.
        for name, path in self.paths.items():
            if path.is_dir():
                raise self._error(name, IsADirectoryError(21, "Is a directory"))
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
        """Put every task file in place, or none: on a failure the files replaced so far get their previous
        content back, and OutputError names the output file that could not be written."""
        for name, task_file in self._files.items():
            try:
                task_file.handle.flush()
                os.fsync(task_file.handle.fileno())
                task_file.handle.close()
            except OSError as exc:
                raise self._error(name, exc) from None
        for name, path in self.paths.items():
            if path.is_dir():
                raise self._error(name, IsADirectoryError(21, "Is a directory"))
        # mkstemp makes 0600 files; outputs get the usual permissions.
        mode = 0o666 & ~_umask()
        replaced: list[tuple[str, Path | None]] = []  # (task, the previous file's backup) in rename order
        try:
            for name, temp in self._temps.items():
                backup = None
                try:
                    os.chmod(temp, mode)
                    backup = self._keep_previous(name)
                    os.replace(temp, self.paths[name])
                except OSError as exc:
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                    restored = self._roll_back(replaced)
                    replaced = []
                    raise self._error(name, exc, restored) from None
                except BaseException:
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                    raise
                replaced.append((name, backup))
        except BaseException:
            self._roll_back(replaced)
            raise
        for _, backup in replaced:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self._sync_folder()
        self._temps.clear()
        self.committed = True
        return list(self.paths.values())

    def _keep_previous(self, name: str) -> Path | None:
        """A hard link to the output file this commit replaces (None when there is none), for a roll-back."""
        path = self.paths[name]
        if not path.exists():
            return None
        for _ in range(100):
            backup = self.out_dir / f".{self.names[name]}.{secrets.token_hex(4)}.previous"
            try:
                os.link(path, backup)
                return backup
            except FileExistsError:
                continue
            except OSError:
                break
        # No hard links here (some network and FUSE folders): a copy keeps the content just as well.
        fd, backup = tempfile.mkstemp(prefix=f".{self.names[name]}.", suffix=".previous", dir=self.out_dir)
        os.close(fd)
        shutil.copy2(path, backup)
        return Path(backup)

    def _roll_back(self, replaced: list[tuple[str, Path | None]]) -> bool:
        """Undo the renames done so far (the previous file back, or none where there was none); True if all were."""
        restored = True
        for name, backup in reversed(replaced):
            path = self.paths[name]
            try:
                if backup is None:
                    path.unlink(missing_ok=True)  # this run created it
                else:
                    os.replace(backup, path)
            except OSError:
                restored = False
        return restored

    def _sync_folder(self) -> None:
        # The renames are durable only once the folder itself is on disk.
        try:
            folder = os.open(self.out_dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(folder)
        except OSError:
            pass
        finally:
            os.close(folder)

    def _error(self, name: str, exc: OSError, restored: bool = True) -> OutputError:
        path = self.paths[name]
        outcome = "no output file was changed" if restored else "some earlier outputs could not be put back"
        return OutputError(f"cannot write {path}: {exc.strerror or exc}; {outcome}", path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self._abort()

    def _abort(self) -> None:
        for task_file in self._files.values():
            with contextlib.suppress(OSError):
                task_file.handle.close()
        for temp in self._temps.values():
            temp.unlink(missing_ok=True)
        self._temps.clear()
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()
