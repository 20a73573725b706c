"""Property tests (hypothesis) for the client's CSV reader and request splitter.

Defined behaviour checked here:
- CSV (RFC 4180 as Python's csv writes it, comma-delimited, header row): every row comes back once, in
  order, with its id and text exactly as written, for any Unicode text (quotes, commas, CR, LF, CRLF,
  NUL, U+2028, emoji), with \\n or \\r\\n line ends, with or without a UTF-8 BOM, in UTF-8 or UTF-16.
- The output files: every (id, text) written comes back from a CSV reader as it was.
  Without an id column the ids are the 1-based row numbers.
- Another delimiter (; tab |) is not guessed: the header is one column, and the reader says that the
  text column is missing, naming what it found; it never yields mis-split rows.
- Undecodable bytes stop the read with an error naming the row.
- Splitting: requests cover the rows in order, each within max_rows and max_bytes, each as full as the
  limits allow; a text too big for any request is an error naming it; pass-through (None) items keep
  their place; a blank or unencodable text is an error naming its index.
"""

from __future__ import annotations

import codecs
import csv
import io

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rel_helpers import COUNTS

from mtl_client import InvalidInputError, plan_batches
from mtl_client.batching import ELEMENT_OVERHEAD, element_cost, stream_batches
from mtl_client.contract import TaskSpec
from mtl_client.csv_input import CsvInput, InputFileError
from mtl_client.predictions import TaskPrediction
from mtl_client.texts import has_content
from mtl_client.writer import AtomicOutputs

pytestmark = pytest.mark.reliability
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(max_size=40)  # every code point except lone surrogates (which UTF-8 cannot carry)
tricky_text = st.one_of(
    any_text,
    st.sampled_from(
        [
            "a,b",
            '"quoted"',
            "x\r\ny",
            "x\ry",
            "x\ny",
            "\x00",
            "\u2028",
            "\ufeff",
            "a;b\tc|d",
            " ",
            "",
            "😀",
            '"',
            "\r",
            "\n",
        ]
    ),
)
rows_strategy = st.lists(st.tuples(tricky_text, tricky_text), max_size=30)


def _encode_csv(
    header: list[str],
    rows: list[list[str]],
    newline: str,
    encoding: str = "utf-8",
    bom: bool = False,
    delimiter: str = ",",
) -> bytes:
    buffer = io.StringIO(newline="")
    # With "\n" line ends, Python's writer leaves a field holding a bare CR unquoted (the file is then
    # ambiguous to every reader), so such files are written with every field quoted.
    quoting = csv.QUOTE_ALL if newline == "\n" else csv.QUOTE_MINIMAL
    writer = csv.writer(buffer, lineterminator=newline, delimiter=delimiter, quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode(encoding)
    return (codecs.BOM_UTF8 if bom else b"") + data


def _read(data: bytes, **kwargs) -> list:
    COUNTS.inputs += 1
    return list(CsvInput(io.BytesIO(data), "in.csv", **kwargs))


@SETTINGS
@given(rows=rows_strategy, newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_csv_rows_out_equal_rows_in(rows, newline, bom):
    assume(rows)
    data = _encode_csv(["id", "text"], [list(r) for r in rows], newline, bom=bom)
    out = _read(data)
    assert [(r.id, r.text) for r in out] == rows
    assert [r.number for r in out] == list(range(1, len(rows) + 1))


@SETTINGS
@given(rows=rows_strategy, encoding=st.sampled_from(["utf-16", "utf-8"]))
def test_csv_any_unicode_in_other_encodings(rows, encoding):
    assume(rows)
    data = _encode_csv(["id", "text"], [list(r) for r in rows], "\r\n", encoding=encoding)
    assert [(r.id, r.text) for r in _read(data, encoding=encoding)] == rows


@SETTINGS
@given(
    texts=st.lists(tricky_text, min_size=1, max_size=30),
    extra=st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3),
    position=st.integers(0, 3),
)
def test_csv_without_id_column_numbers_rows_and_finds_text_anywhere(texts, extra, position):
    header = list(extra)
    header.insert(min(position, len(header)), "text")
    rows = [["filler"] * len(header) for _ in texts]
    for row, text in zip(rows, texts):
        row[header.index("text")] = text
    out = _read(_encode_csv(header, rows, "\n"))
    assert [(r.id, r.text) for r in out] == [(i + 1, t) for i, t in enumerate(texts)]


@SETTINGS
@given(
    rows=st.lists(st.tuples(any_text, any_text), min_size=1, max_size=10), delimiter=st.sampled_from([";", "\t", "|"])
)
def test_csv_other_delimiters_are_reported_not_guessed(rows, delimiter):
    data = _encode_csv(["id", "text"], [list(r) for r in rows], "\r\n", delimiter=delimiter)
    COUNTS.inputs += 1
    with pytest.raises(InputFileError) as error:
        list(CsvInput(io.BytesIO(data), "in.csv"))
    assert "no column 'text'" in str(error.value) and repr(f"id{delimiter}text") in str(error.value), error.value


@SETTINGS
@given(
    rows=st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters='\r\n"', blacklist_categories=("Cs",)), min_size=1, max_size=20
        ),
        min_size=1,
        max_size=20,
    ),
    data=st.data(),
    bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80"]),
)
def test_csv_undecodable_bytes_name_the_row(rows, data, bad):
    index = data.draw(st.integers(0, len(rows) - 1))
    encoded = _encode_csv(["text"], [[t] for t in rows], "\n")
    lines = encoded.split(b"\n")
    lines[index + 1] = lines[index + 1] + bad  # line 0 is the header
    COUNTS.inputs += 1
    with pytest.raises(InputFileError) as error:
        list(CsvInput(io.BytesIO(b"\n".join(lines)), "in.csv"))
    assert f"row {index + 1} (line {index + 2}) is not valid utf-8" in str(error.value), error.value


# -- the request splitter ----------------------------------------------------------------------------
texts_strategy = st.lists(st.text(min_size=1, max_size=60).filter(str.strip), max_size=80)


@SETTINGS
@given(texts=texts_strategy, max_rows=st.integers(1, 300), slack=st.integers(0, 400))
def test_plan_batches_covers_every_row_in_order_within_limits(texts, max_rows, slack):
    costs = [element_cost(t) for t in texts]
    max_bytes = max(costs + [ELEMENT_OVERHEAD + 1]) + slack
    COUNTS.inputs += 1
    ranges = plan_batches(texts, max_rows, max_bytes)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(len(texts)))
    for number, (start, stop) in enumerate(ranges):
        assert 0 < stop - start <= max_rows
        assert sum(costs[start:stop]) <= max_bytes
        if number < len(ranges) - 1:  # greedy: the next row did not fit
            assert stop - start == max_rows or sum(costs[start : stop + 1]) > max_bytes


@SETTINGS
@given(texts=texts_strategy.filter(bool), data=st.data())
def test_plan_batches_names_a_text_too_big_for_any_request(texts, data):
    index = data.draw(st.integers(0, len(texts) - 1))
    costs = [element_cost(t) for t in texts]
    assume(all(c < costs[index] for c in costs[:index]))  # the first too-big one is `index`
    assume(costs[index] - 1 > ELEMENT_OVERHEAD)
    COUNTS.inputs += 1
    with pytest.raises(InvalidInputError) as error:
        plan_batches(texts, 256, costs[index] - 1)
    assert error.value.index == index


# Texts with something to read (the rule server and client share: mtl_client.texts.has_content), or None (a skip).
items_strategy = st.lists(st.one_of(st.none(), st.text(min_size=1, max_size=60).filter(has_content)), max_size=120)


@SETTINGS
@given(
    items=items_strategy,
    max_rows=st.integers(1, 40),
    slack=st.integers(0, 300),
    max_items=st.one_of(st.none(), st.integers(1, 50)),
)
def test_stream_batches_keep_every_item_once_in_order(items, max_rows, slack, max_items):
    max_bytes = max([element_cost(t) for t in items if t is not None] + [ELEMENT_OVERHEAD + 1]) + slack
    COUNTS.inputs += 1
    batches = list(stream_batches(list(enumerate(items)), max_rows, max_bytes, max_items))
    assert [tag for b in batches for tag in b.tags] == list(range(len(items)))
    for batch in batches:
        assert batch.tags and len(batch.tags) <= (max_items or 4 * max_rows)
        assert batch.texts == [items[tag] for tag in batch.tags]
        assert batch.sent == [tag for tag in batch.tags if items[tag] is not None]
        assert batch.encoded == [items[tag].encode("utf-8") for tag in batch.sent]
        assert len(batch.sent) <= max_rows
        assert sum(len(e) + ELEMENT_OVERHEAD for e in batch.encoded) <= max_bytes


BLANK_OR_UNENCODABLE = ["", "   ", "\t\n", "\u200b\ufeff", "\ud800", "ok \udfff"]


@SETTINGS
@given(items=items_strategy, data=st.data(), bad=st.sampled_from(BLANK_OR_UNENCODABLE))
def test_stream_batches_name_a_blank_or_unencodable_text(items, data, bad):
    index = data.draw(st.integers(0, len(items)))
    items = items[:index] + [bad] + items[index:]
    COUNTS.inputs += 1
    with pytest.raises(InvalidInputError) as error:
        list(stream_batches(list(enumerate(items)), 64, 1 << 20))
    assert error.value.index == index


# -- the output writer -----------------------------------------------------------------------------------
@SETTINGS
@given(rows=st.lists(st.tuples(tricky_text, tricky_text), min_size=1, max_size=20))
def test_output_csv_rows_read_back_as_written(tmp_path_factory, rows):
    out_dir = tmp_path_factory.mktemp("writer")
    task = TaskSpec("topic", ("a", "b"))
    prediction = {"topic": TaskPrediction("a", 0.75, {"a": 0.75, "b": 0.25})}
    COUNTS.inputs += 1
    with AtomicOutputs(out_dir, {"topic": "topic.csv"}, (task,), "csv") as outputs:
        for row_id, text in rows:
            outputs.write(row_id, text, prediction, False)
        outputs.commit()
    with (out_dir / "topic.csv").open(newline="", encoding="utf-8") as handle:
        back = [(r["id"], r["text"]) for r in csv.DictReader(handle)]
    assert back == rows
