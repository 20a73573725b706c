"""A user's CSV of sentences → perf_analyzer's --input-data JSON for the TEXT (TYPE_STRING, dims [1]) input.

Layout: one entry per sentence, `{"TEXT": {"content": [sentence], "shape": [1]}}`. The shape is the
tensor's own dims, without the batch dimension: perf_analyzer prepends the batch size. With `-b N` it
builds each request from N consecutive entries (step*N ... step*N+N-1, wrapping around), so the same
file gives distinct real sentences to 1-sentence and 64-sentence requests.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

INPUT_NAME = "TEXT"


class InputError(ValueError):
    """The CSV cannot feed a load test; the message names the file and the problem."""


@dataclass(frozen=True)
class Sentences:
    texts: list[str]
    skipped_empty: int


def read_sentences(path: Path, text_column: str = "text", limit: int | None = None) -> Sentences:
    """The non-empty texts of `text_column`, in file order (at most `limit`)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise InputError(f"{path}: no column {text_column!r} (columns: {', '.join(reader.fieldnames or [])})")
            texts, skipped = [], 0
            for row in reader:
                text = row[text_column] or ""
                # The model answers an empty text with INVALID_ARG, which would abort perf_analyzer.
                if not text.strip():
                    skipped += 1
                    continue
                texts.append(text)
                if limit is not None and len(texts) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    if not texts:
        raise InputError(f"{path}: no non-empty text in column {text_column!r}")
    return Sentences(texts, skipped)


def input_data(texts: list[str]) -> dict:
    return {"data": [{INPUT_NAME: {"content": [text], "shape": [1]}} for text in texts]}


def write_input_data(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(texts), ensure_ascii=False), encoding="utf-8")
    return path
