"""Reading the CLI's input CSV lazily, with messages that name the row and the problem."""
from __future__ import annotations

import array
import codecs
import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .batching import ELEMENT_OVERHEAD
from .errors import InvalidInputError

# Texts over 131,072 characters (csv's default cap) are legal input; the server truncates by tokens.
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))


class InputFileError(InvalidInputError):
    """The input file itself is unusable: encoding, CSV syntax, header, a row's shape, its size."""


@dataclass(frozen=True)
class InputRow:
    number: int  # 1-based data row (the header is not a row; blank lines are skipped)
    id: str | int  # the id column's value, or `number` when the file has no id column
    text: str


# Line breaks as csv expects from a file opened with newline="": \r\n, \r or \n, kept on the line.
_BREAK = re.compile(r"\r\n?|\n")


class _Lines:
    """Decoded lines of a binary stream (line endings kept), counting the lines given out."""

    def __init__(self, stream: BinaryIO, encoding: str):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.line = 0  # lines given out so far; on a decoding error, the line that failed

    def __iter__(self) -> Iterator[str]:
        pending = ""
        for raw in self.stream:
            try:
                pending += self.decoder.decode(raw)
            except UnicodeDecodeError:
                self.line += 1
                raise
            # Re-split the decoded text: a lone \r ends a line, and UTF-16 does not split on b"\n".
            start = 0
            while match := _BREAK.search(pending, start):
                if match.group() == "\r" and match.end() == len(pending):
                    break  # maybe the first half of a \r\n split across reads
                self.line += 1
                yield pending[start:match.end()]
                start = match.end()
            pending = pending[start:]
        pending += self.decoder.decode(b"", final=True)
        start = 0
        while match := _BREAK.search(pending, start):
            self.line += 1
            yield pending[start:match.end()]
            start = match.end()
        if pending[start:]:
            self.line += 1
            yield pending[start:]


class CsvInput:
    """Rows of a CSV with a header, read lazily: `for row in CsvInput(stream, "data.csv"): ...`.

    The header is read when the object is made: a missing text column (or an explicitly asked-for
    id column) is reported with the columns found. Iterating raises InputFileError naming the row on
    undecodable bytes, broken CSV or a short row, and at the end if there was no data row at all.
    """

    def __init__(self, stream: BinaryIO, name: str, *, text_column: str = "text", id_column: str | None = "id",
                 id_required: bool = False, encoding: str = "utf-8"):
        self.name = name
        self.encoding = encoding
        # A UTF-8 BOM (as Excel writes) is skipped when present.
        decoder_encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        self._lines = _Lines(stream, decoder_encoding)
        # strict: a stray quote is an error, not a silent merge of rows into one text.
        self._reader = csv.reader(self._lines, strict=True)
        self.rows_read = 0
        self.header = self._read_header()
        columns = ", ".join(repr(c) for c in self.header)
        if text_column not in self.header:
            raise InputFileError(f"{name}: no column {text_column!r}; columns found: {columns} "
                                 f"(choose one with --text-column)")
        self.text_index = self.header.index(text_column)
        self.id_index = None
        if id_column and id_column in self.header:
            self.id_index = self.header.index(id_column)
        elif id_required:
            raise InputFileError(f"{name}: no id column {id_column!r}; columns found: {columns}")

    def _next_record(self, where: str) -> list[str] | None:
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start:exc.start + 4].hex(" ") if isinstance(exc.object, bytes) else "?"
            raise InputFileError(
                f"{self.name}: {where} (line {self._lines.line}) is not valid {self.encoding} (bytes {bad}: "
                f"{exc.reason}); if the file uses another encoding, pass it with --encoding, e.g. --encoding latin-1",
                index=self.rows_read if where != "header" else None, reason="undecodable bytes",
            ) from None
        except csv.Error as exc:
            raise InputFileError(f"{self.name}: {where} (line {self._lines.line}) is not valid CSV: {exc}",
                                 index=self.rows_read if where != "header" else None, reason=str(exc)) from None

    def _read_header(self) -> list[str]:
        while (record := self._next_record("header")) is not None:
            if record:
                return record
        raise InputFileError(f"{self.name}: the file is empty (no header row)")

    def __iter__(self) -> Iterator[InputRow]:
        width = len(self.header)
        needed = max(self.text_index, self.id_index if self.id_index is not None else -1)
        while (record := self._next_record(f"row {self.rows_read + 1}")) is not None:
            if not record:  # a blank line is not a row
                continue
            self.rows_read += 1
            number = self.rows_read
            if len(record) <= needed:
                raise InputFileError(
                    f"{self.name}: row {number} (line {self._lines.line}) has {len(record)} field(s) but the header "
                    f"has {width}: no value for column {self.header[needed]!r}",
                    index=number - 1, reason="short row",
                )
            row_id = record[self.id_index] if self.id_index is not None else number
            yield InputRow(number, row_id, record[self.text_index])
        if self.rows_read == 0:
            raise InputFileError(f"{self.name}: the file has a header ({', '.join(self.header)}) but no data rows")


class RowChecker:
    """Checks each row's text before it is sent, counting the empty ones and remembering id hashes.

    Memory stays small on big files: 8 bytes per row for the duplicate-id check, the first few
    empty rows, and counters.
    """

    def __init__(self, name: str, *, allow_empty: bool, max_request_bytes: int, check_ids: bool, shown: int = 5):
        self.name = name
        self.allow_empty = allow_empty
        self.max_text_bytes = max_request_bytes - ELEMENT_OVERHEAD
        self.shown = shown
        self.rows = 0
        self.empty_rows: list[int] = []
        self.empty_count = 0
        self._ids = array.array("q") if check_ids else None

    def check(self, row: InputRow) -> bool:
        """True when the row's text is to be sent; False for an empty text (allowed or not).

        A text too big for one request raises InputFileError at once.
        """
        self.rows += 1
        if self._ids is not None:
            self._ids.append(hash(row.id))
        text = row.text
        if not text.strip():
            self.empty_count += 1
            if len(self.empty_rows) < self.shown:
                self.empty_rows.append(row.number)
            return False
        # Only long texts need measuring: a character is at most 4 bytes of UTF-8.
        size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > self.max_text_bytes else 0
        if size > self.max_text_bytes:
            raise InputFileError(
                f"{self.name}: row {row.number}: the text is {size:,} bytes of UTF-8, more than fits in one request "
                f"({self.max_text_bytes:,} bytes); shorten it (the model reads only its first tokens anyway)",
                index=row.number - 1, reason="text too large",
            )
        return True

    @property
    def failed(self) -> bool:
        return self.empty_count > 0 and not self.allow_empty

    def error(self) -> InputFileError:
        listed = ", ".join(map(str, self.empty_rows)) + (", ..." if self.empty_count > len(self.empty_rows) else "")
        return InputFileError(
            f"{self.name}: {self.empty_count} row(s) with an empty or whitespace-only text: row {listed} "
            f"(fix them, or pass --allow-empty to write them unscored)",
            index=self.empty_rows[0] - 1, indices=[r - 1 for r in self.empty_rows], count=self.empty_count,
            reason="empty or whitespace-only text",
        )

    def duplicate_ids(self, shown: int = 5) -> tuple[int, list[tuple[int, int]]]:
        """(rows whose id repeats an earlier row's, the first few (earlier row, row) pairs)."""
        if self._ids is None or len(self._ids) < 2:
            return 0, []
        hashes = np.frombuffer(self._ids, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
        if repeats.size == 0:
            return 0, []
        # For each repeat, the first row of its group of equal ids (stable sort keeps file order).
        starts = np.r_[True, ordered[1:] != ordered[:-1]]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(len(ordered)), 0))
        pairs = sorted(((int(order[group_start[i]]) + 1, int(order[i]) + 1) for i in repeats), key=lambda p: p[1])
        return int(repeats.size), pairs[:shown]
