"""Reading the CLI's input CSV lazily, with messages that name the row and the problem."""

from __future__ import annotations

import array
import codecs
import contextlib
import csv
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .batching import ELEMENT_OVERHEAD
from .errors import InvalidInputError
from .texts import EMPTY_TEXT, has_content

# Texts over 131,072 characters (csv's default cap) are legal input; the server truncates by tokens, and
# CsvInput's own `max_row_chars` bounds what one row may hold while it is read.
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))

# Bytes read from the input at a time: a huge field is refused before it is all in memory.
READ_CHUNK = 64 * 1024
# Room in a row for its id and other columns, beyond the largest text one request can carry.
OTHER_COLUMNS_ALLOWANCE = 1024 * 1024


def max_row_chars(max_request_bytes: int) -> int:
    """The characters a row may hold: a text too big for any request (plus room for other columns) is refused
    while it is read, instead of being held whole."""
    return max_request_bytes + OTHER_COLUMNS_ALLOWANCE


def parse_delimiter(value: str) -> str:
    """One character; `\\t`, `tab` and a literal tab mean a tab (TSV)."""
    named = {"\\t": "\t", "tab": "\t", "TAB": "\t"}
    delimiter = named.get(value, value)
    if len(delimiter) != 1:
        raise ValueError(f"{value!r} is not one character (use '\\t' or 'tab' for a tab)")
    if delimiter in '"\r\n' or delimiter.isalnum():
        raise ValueError(f"{value!r} cannot separate fields (a quote, a line break, a letter or a digit)")
    return delimiter


class InputFileError(InvalidInputError):
    """The input file itself is unusable: encoding, CSV syntax, header, a row's shape, its size."""


class InputSource:
    """Where the CSV comes from: `-` (stdin), a regular file, or a pipe such as a FIFO or `<(...)`.

    Only a regular file can be read twice (a check of the whole file before anything is sent); stdin and
    pipes are read once, checked as they stream.
    """

    def __init__(self, path: str):
        self.path = path
        self.name = "<stdin>" if path == "-" else path
        if path == "-":
            self.rereadable = False
            return
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise InputFileError(f"{path}: no such file") from None
        except OSError as exc:
            raise InputFileError(f"{path}: cannot read it ({exc.strerror})") from None
        if stat.S_ISDIR(mode):
            raise InputFileError(f"{path}: is a folder, not a CSV file")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
            raise InputFileError(f"{path}: not a file or a pipe (use - for a pipe on stdin)")
        self.rereadable = stat.S_ISREG(mode)

    def open(self):
        """A binary stream, as a context manager (stdin is left open)."""
        if self.path == "-":
            return contextlib.nullcontext(sys.stdin.buffer)
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise InputFileError(f"{self.path}: cannot read it ({exc.strerror})") from None


@dataclass(frozen=True)
class InputRow:
    number: int  # 1-based data row (the header is not a row; blank lines are skipped)
    id: str | int  # the id column's value, or `number` when the file has no id column
    text: str
    extra: tuple[str, ...] = ()  # the values of CsvInput.select_columns(...), in that order


# Line breaks as csv expects from a file opened with newline="": \r\n, \r or \n, kept on the line.
_BREAK = re.compile(r"\r\n?|\n")


class _RowTooLarge(Exception):
    pass


class _Lines:
    """Decoded lines of a binary stream (line endings kept), counting the lines given out.

    The stream is read in chunks; `row_chars` counts the characters of the row being read (the owner
    resets it after each row), and more than `max_row_chars` raises _RowTooLarge before more is read.
    """

    def __init__(self, stream: BinaryIO, encoding: str, max_row_chars: int | None = None):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.line = 0  # lines given out so far; on a decoding error, the line that failed
        self.max_row_chars = max_row_chars
        self.row_chars = 0

    def _chunks(self) -> Iterator[bytes]:
        # read1 returns what a pipe has now, so stdin streams row by row instead of waiting for a full chunk.
        read = getattr(self.stream, "read1", None) or getattr(self.stream, "read", None)
        if read is None:
            yield from self.stream
            return
        while chunk := read(READ_CHUNK):
            yield chunk

    def _check_size(self, pending_chars: int) -> None:
        if self.max_row_chars is not None and self.row_chars + pending_chars > self.max_row_chars:
            raise _RowTooLarge

    def _give(self, line: str) -> str:
        self._check_size(len(line))
        self.line += 1
        self.row_chars += len(line)
        return line

    @staticmethod
    def _split(pending: str, scan_from: int, final: bool) -> tuple[list[str], int]:
        """The whole lines of `pending`, and the offset where the unfinished rest begins."""
        lines, start = [], 0
        while match := _BREAK.search(pending, max(start, scan_from)):
            if not final and match.group() == "\r" and match.end() == len(pending):
                break  # maybe the first half of a \r\n split across reads
            lines.append(pending[start : match.end()])
            start = match.end()
        return lines, start

    def _feed(self, text: str) -> Iterator[str]:
        self._pending += text
        lines, start = self._split(self._pending, self._scan_from, final=False)
        self._pending = self._pending[start:]
        for line in lines:
            yield self._give(line)
        # Only new text can hold a break (less one character: a \r waiting for its \n).
        self._scan_from = max(len(self._pending) - 1, 0)
        self._check_size(len(self._pending))

    def __iter__(self) -> Iterator[str]:
        self._pending, self._scan_from = "", 0
        for raw in self._chunks():
            try:
                text = self.decoder.decode(raw)
            except UnicodeDecodeError:
                # Again line by line (a failed decode keeps the decoder's state), so that every good line
                # is given out before the bad one raises and the error names the right row.
                for part in raw.splitlines(keepends=True):
                    try:
                        text = self.decoder.decode(part)
                    except UnicodeDecodeError:
                        self.line += 1
                        raise
                    yield from self._feed(text)
                continue
            # Re-split the decoded text: a lone \r ends a line, and UTF-16 does not split on b"\n".
            yield from self._feed(text)
        pending = self._pending + self.decoder.decode(b"", final=True)
        lines, start = self._split(pending, 0, final=True)
        for line in lines:
            yield self._give(line)
        if pending[start:]:
            yield self._give(pending[start:])


class CsvInput:
    """Rows of a CSV with a header, read lazily: `for row in CsvInput(stream, "data.csv"): ...`.

    The header is read when the object is made: a missing text column (or an explicitly asked-for
    id column) is reported with the columns found, and so is a column name given twice. Iterating
    raises InputFileError naming the row on undecodable bytes, broken CSV, a row with more fields
    than the header (or too few for the columns used), a row over `max_row_chars` characters (refused
    as soon as that much is read), and at the end if there was no data row at all.
    """

    def __init__(
        self,
        stream: BinaryIO,
        name: str,
        *,
        text_column: str = "text",
        id_column: str | None = "id",
        id_required: bool = False,
        encoding: str = "utf-8",
        delimiter: str = ",",
        max_row_chars: int | None = None,
    ):
        self.name = name
        self.encoding = encoding
        self.delimiter = delimiter
        self.max_row_chars = max_row_chars
        # A UTF-8 BOM (as Excel writes) is skipped when present.
        decoder_encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        self._lines = _Lines(stream, decoder_encoding, max_row_chars)
        # strict: a stray quote is an error, not a silent merge of rows into one text.
        self._reader = csv.reader(self._lines, delimiter=delimiter, strict=True)
        self.rows_read = 0
        self.header = self._read_header()
        self.columns_text = ", ".join(repr(c) for c in self.header)
        self._check_unique_header()
        if text_column not in self.header:
            hint = "choose one with --text-column"
            if delimiter == "," and len(self.header) == 1 and ("\t" in self.header[0] or ";" in self.header[0]):
                hint += "; for another separator, pass --delimiter (e.g. --delimiter tab)"
            raise InputFileError(f"{name}: no column {text_column!r}; columns found: {self.columns_text} ({hint})")
        self.text_index = self.header.index(text_column)
        self.id_index = None
        self.id_column = None
        if id_column and id_column in self.header:
            self.id_index = self.header.index(id_column)
            self.id_column = id_column
        elif id_required:
            raise InputFileError(f"{name}: no id column {id_column!r}; columns found: {self.columns_text}")
        self.extra_indices: tuple[int, ...] = ()

    def select_columns(self, names: Sequence[str]) -> None:
        """Give each row's values of these columns (which must be in the header) as `InputRow.extra`."""
        missing = [n for n in names if n not in self.header]
        if missing:
            raise InputFileError(f"{self.name}: no column {missing[0]!r}; columns found: {self.columns_text}")
        self.extra_indices = tuple(self.header.index(n) for n in names)

    def _check_unique_header(self) -> None:
        seen: dict[str, int] = {}
        for position, column in enumerate(self.header, 1):
            if column in seen:
                raise InputFileError(
                    f"{self.name}: the header names column {column!r} twice (columns {seen[column]} and {position}); "
                    f"each column needs its own name"
                )
            seen[column] = position

    def _next_record(self, where: str) -> list[str] | None:
        self._lines.row_chars = 0
        first_line = self._lines.line + 1
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 4].hex(" ") if isinstance(exc.object, bytes) else "?"
            raise InputFileError(
                f"{self.name}: {where} (line {self._lines.line}) is not valid {self.encoding} (bytes {bad}: "
                f"{exc.reason}); if the file uses another encoding, pass it with --encoding, e.g. --encoding latin-1",
                index=self.rows_read if where != "header" else None,
                reason="undecodable bytes",
            ) from None
        except csv.Error as exc:
            raise InputFileError(
                f"{self.name}: {where} (line {self._lines.line}) is not valid CSV: {exc}",
                index=self.rows_read if where != "header" else None,
                reason=str(exc),
            ) from None
        except _RowTooLarge:
            raise InputFileError(
                f"{self.name}: {where} (from line {first_line}) is too large: over {self.max_row_chars:,} characters "
                f"were read without reaching its end, more than one request can carry; shorten its text "
                f"(the model reads only its first tokens anyway)",
                index=self.rows_read if where != "header" else None,
                reason="row too large",
            ) from None

    def _read_header(self) -> list[str]:
        while (record := self._next_record("header")) is not None:
            if record:
                return record
        raise InputFileError(f"{self.name}: the file is empty (no header row)")

    def __iter__(self) -> Iterator[InputRow]:
        width = len(self.header)
        needed = max(self.text_index, self.id_index if self.id_index is not None else -1, *self.extra_indices)
        while True:
            first_line = self._lines.line + 1
            record = self._next_record(f"row {self.rows_read + 1}")
            if record is None:
                break
            if not record:  # a blank line is not a row
                continue
            self.rows_read += 1
            number = self.rows_read
            fields = f"{len(record)} field{'s' if len(record) != 1 else ''}"
            if len(record) > width:
                separator = "a tab" if self.delimiter == "\t" else repr(self.delimiter)
                raise InputFileError(
                    f"{self.name}: row {number} has {fields} but the header has {width} (line {first_line}): "
                    f'a text holding {separator} must be quoted ("...")',
                    index=number - 1,
                    reason=f"{fields} but the header has {width}",
                )
            if len(record) <= needed:
                raise InputFileError(
                    f"{self.name}: row {number} has {fields} but the header has {width} (line {first_line}): "
                    f"no value for column {self.header[needed]!r}",
                    index=number - 1,
                    reason="short row",
                )
            row_id = record[self.id_index] if self.id_index is not None else number
            yield InputRow(number, row_id, record[self.text_index], tuple(record[i] for i in self.extra_indices))
        if self.rows_read == 0:
            raise InputFileError(f"{self.name}: the file has a header ({', '.join(self.header)}) but no data rows")


class RowChecker:
    """Checks each row's text and id before it is sent, counting the empty ones and remembering id hashes.

    Memory stays small on big files: 8 bytes per row for the duplicate-id check, the first few
    empty rows, and counters.
    """

    def __init__(
        self,
        name: str,
        *,
        allow_empty: bool,
        max_request_bytes: int,
        check_ids: bool,
        shown: int = 5,
        id_column: str | None = None,
    ):
        self.name = name
        self.allow_empty = allow_empty
        self.max_text_bytes = max_request_bytes - ELEMENT_OVERHEAD
        self.shown = shown
        self.id_column = id_column
        self.rows = 0
        self.empty_rows: list[int] = []
        self.empty_count = 0
        self.empty_id_rows: list[int] = []
        self.empty_id_count = 0
        self._ids = array.array("q") if check_ids else None

    def check(self, row: InputRow) -> bool:
        """True when the row's text is to be sent; False for an empty text (allowed or not).

        A text too big for one request raises InputFileError at once.
        """
        self.rows += 1
        if self._ids is not None:
            self._ids.append(hash(row.id))
        if isinstance(row.id, str) and not row.id.strip():
            self.empty_id_count += 1
            if len(self.empty_id_rows) < self.shown:
                self.empty_id_rows.append(row.number)
        text = row.text
        if not has_content(text):
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
                index=row.number - 1,
                reason="text too large",
            )
        return True

    @property
    def failed(self) -> bool:
        return self.empty_id_count > 0 or (self.empty_count > 0 and not self.allow_empty)

    @staticmethod
    def _listed(rows: list[int], count: int) -> str:
        return ", ".join(map(str, rows)) + (", ..." if count > len(rows) else "")

    def error(self) -> InputFileError:
        problems, first = [], []
        if self.empty_id_count:
            column = f" (column {self.id_column!r})" if self.id_column else ""
            problems.append(
                f"{self.empty_id_count} row(s) with an empty id{column}: "
                f"row {self._listed(self.empty_id_rows, self.empty_id_count)} (give every row an id)"
            )
            first.append(self.empty_id_rows[0])
        if self.empty_count and not self.allow_empty:
            problems.append(
                f"{self.empty_count} row(s) with an {EMPTY_TEXT}: "
                f"row {self._listed(self.empty_rows, self.empty_count)} "
                f"(fix them, or pass --allow-empty to write them unscored)"
            )
            first.append(self.empty_rows[0])
        rows = sorted(set(self.empty_id_rows + (self.empty_rows if not self.allow_empty else [])))[: self.shown]
        only_texts = not self.empty_id_count
        return InputFileError(
            f"{self.name}: {'; '.join(problems)}",
            index=min(first) - 1,
            indices=[r - 1 for r in rows],
            count=self.empty_count if only_texts else None,
            reason=EMPTY_TEXT if only_texts else "empty id",
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
