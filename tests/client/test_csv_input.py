"""The CLI's CSV reader and row checks: encodings, CSV syntax, headers, empty and oversized texts, ids."""

import io
import re

import pytest

from mtl_client.csv_input import READ_CHUNK, CsvInput, InputFileError, InputRow, RowChecker, parse_delimiter


def _rows(data: bytes, **options):
    return list(CsvInput(io.BytesIO(data), "in.csv", **options))


def test_rows_with_ids_in_order():
    rows = _rows(b"id,text\na1,first\na2,second\n")
    assert rows == [InputRow(1, "a1", "first"), InputRow(2, "a2", "second")]


def test_without_an_id_column_ids_are_row_numbers():
    rows = _rows(b"text,other\nfirst,x\nsecond,y\n")
    assert [(r.id, r.text) for r in rows] == [(1, "first"), (2, "second")]


def test_an_asked_for_id_column_must_exist():
    with pytest.raises(InputFileError, match="no id column 'key'; columns found: 'text'"):
        CsvInput(io.BytesIO(b"text\nx\n"), "in.csv", id_column="key", id_required=True)


def test_utf8_bom_quoted_commas_and_newlines():
    data = '\ufeffid,text\n1,"Hello, world"\n2,"line one\nline two"\n3,"He said ""hi"""\n'.encode()
    rows = _rows(data)
    assert [r.text for r in rows] == ["Hello, world", "line one\nline two", 'He said "hi"']
    assert [r.number for r in rows] == [1, 2, 3]


def test_crlf_line_endings_and_blank_lines():
    rows = _rows(b'id,text\r\n1,a\r\n\r\n2,"b\r\nc"\r\n\r\n')
    assert [(r.number, r.id, r.text) for r in rows] == [(1, "1", "a"), (2, "2", "b\r\nc")]


def test_other_encodings():
    assert _rows("id,text\n1,café\n".encode("latin-1"), encoding="latin-1")[0].text == "café"
    assert _rows("id,text\n1,naïve ünïcode\n2,x\n".encode("utf-16"), encoding="utf-16")[0].text == "naïve ünïcode"


def test_invalid_utf8_names_row_and_line_and_suggests_encoding():
    data = b'id,text\n1,fine\n2,"multi\nline"\n3,caf\xe9\n'
    with pytest.raises(InputFileError) as info:
        _rows(data)
    message = str(info.value)
    assert "in.csv: row 3 (line 5) is not valid utf-8 (bytes e9" in message
    assert "--encoding" in message
    assert info.value.index == 2


def test_invalid_utf8_in_the_header():
    with pytest.raises(InputFileError, match=r"header \(line 1\) is not valid utf-8"):
        _rows(b"id,t\xffext\n1,x\n")


def test_missing_text_column_lists_columns_found():
    with pytest.raises(InputFileError, match="no column 'text'; columns found: 'id', 'body', 'lang'"):
        _rows(b"id,body,lang\n1,x,en\n")
    assert _rows(b"id,body\n1,x\n", text_column="body")[0].text == "x"


@pytest.mark.parametrize("data", [b"", b"\n\n", "\ufeff".encode()])
def test_empty_file(data):
    with pytest.raises(InputFileError, match="the file is empty"):
        _rows(data)


def test_header_only_file():
    with pytest.raises(InputFileError, match=r"has a header \(id, text\) but no data rows"):
        _rows(b"id,text\n")


def test_short_row_is_reported():
    with pytest.raises(
        InputFileError, match=r"row 2 has 1 field but the header has 2 \(line 3\): no value for column 'text'"
    ):
        _rows(b"id,text\n1,ok\n2\n")


def test_a_row_with_more_fields_than_the_header_is_refused_not_cut():
    # The repro: an unquoted comma used to cut the text silently at "Shares rose".
    with pytest.raises(InputFileError) as info:
        _rows(b"id,text\nx1,Shares rose, but the bank warned\n")
    assert str(info.value).startswith("in.csv: row 1 has 3 fields but the header has 2 (line 2)")
    assert "must be quoted" in str(info.value) and info.value.index == 0
    # The row is named wherever it is, also after a multi-line row, and for a tab-separated file.
    with pytest.raises(InputFileError, match=r"row 3 has 4 fields but the header has 3 \(line 5\)"):
        _rows(b'id,text,lang\n1,ok,en\n2,"two\nlines",en\n3,a,b,c\n')
    with pytest.raises(InputFileError, match="row 1 has 3 fields but the header has 2 .line 2.: a text holding a tab"):
        _rows(b"id\ttext\n1\tone\ttwo\n", delimiter="\t")
    # Quoted, the same text is one field.
    assert _rows(b'id,text\nx1,"Shares rose, but the bank warned"\n')[0].text == "Shares rose, but the bank warned"


@pytest.mark.parametrize(
    "header, message",
    [
        (b"id,text,id,text", "the header names column 'id' twice (columns 1 and 3)"),
        (b"text,label,text", "the header names column 'text' twice (columns 1 and 3)"),
        (b"id,,text,", "the header names column '' twice (columns 2 and 4)"),
    ],
)
def test_a_column_name_given_twice_is_refused(header, message):
    with pytest.raises(InputFileError, match=re.escape(f"in.csv: {message}")):
        CsvInput(io.BytesIO(header + b"\n1,a,2,b\n"), "in.csv")


def test_tab_separated_input():
    rows = _rows(b'id\ttext\n1\tShares rose, but the bank warned\n2\t"a\ttab inside"\n', delimiter="\t")
    assert [(r.id, r.text) for r in rows] == [("1", "Shares rose, but the bank warned"), ("2", "a\ttab inside")]
    # Read as commas, a TSV is one column: the message points at --delimiter.
    with pytest.raises(InputFileError, match="--delimiter"):
        _rows(b"id\ttext\n1\tx\n")


@pytest.mark.parametrize(
    "value, expected", [(",", ","), (";", ";"), ("|", "|"), ("\t", "\t"), ("\\t", "\t"), ("tab", "\t")]
)
def test_delimiter_names(value, expected):
    assert parse_delimiter(value) == expected


@pytest.mark.parametrize("value", ["", ",,", '"', "\n", "a", "7"])
def test_delimiter_that_cannot_separate_fields(value):
    with pytest.raises(ValueError):
        parse_delimiter(value)


def test_select_columns_gives_their_values_in_order():
    source = CsvInput(io.BytesIO(b"text,topic,lang,sentiment\nhi,tech,en,\n"), "in.csv")
    source.select_columns(["sentiment", "topic"])
    assert [r.extra for r in source] == [("", "tech")]
    with pytest.raises(InputFileError, match="no column 'urgency'"):
        CsvInput(io.BytesIO(b"text\nx\n"), "in.csv").select_columns(["urgency"])


class _LazyBytes:
    """A stream of `size` bytes of one field, counting what was read from it."""

    def __init__(self, head: bytes, size: int):
        self.head, self.left, self.read_bytes = head, size, 0

    def read1(self, n: int) -> bytes:
        if self.head:
            chunk, self.head = self.head, b""
        else:
            chunk = b"x" * min(n, self.left)
            self.left -= len(chunk)
        self.read_bytes += len(chunk)
        return chunk


def test_a_huge_field_is_refused_while_reading_not_held_whole():
    stream = _LazyBytes(b'id,text\nb1,ok\nb2,"', 50 * 1024 * 1024)
    rows = iter(CsvInput(stream, "in.csv", max_row_chars=1_000_000))
    assert next(rows).text == "ok"
    with pytest.raises(InputFileError) as info:
        next(rows)
    assert str(info.value).startswith("in.csv: row 2 (from line 3) is too large: over 1,000,000 characters")
    assert info.value.index == 1
    # It stopped about where the row passed the limit (one read chunk of slack), not at the end of 50 MB.
    assert stream.read_bytes < 1_000_000 + 2 * READ_CHUNK


def test_rows_up_to_the_row_limit_are_read_whole():
    text = "y" * 5000
    data = f'id,text\n1,{text}\n2,"{text}\n{text}"\n'.encode()
    rows = _rows(data, max_row_chars=2 * 5000 + 20)
    assert [len(r.text) for r in rows] == [5000, 10001]
    with pytest.raises(InputFileError, match="row 1 .from line 2. is too large"):
        _rows(data, max_row_chars=4000)


def test_lines_split_across_read_chunks():
    # \r\n split between two reads, and a multi-byte character split between two reads, in UTF-8 and UTF-16.
    text = "é" * (READ_CHUNK // 2 - 3)
    for encoding in ("utf-8", "utf-16"):
        data = f"id,text\r\n1,{text}\r\n2,b\r\n".encode(encoding)
        rows = _rows(data, encoding=encoding)
        assert [(r.id, r.text) for r in rows] == [("1", text), ("2", "b")]
    # The \r of a \r\n is the last byte of the first read.
    ascii_text = "y" * (READ_CHUNK - len("id,text\r\n1,") - 1)
    data = f"id,text\r\n1,{ascii_text}\r\n2,b,c\r\n".encode()
    assert data[READ_CHUNK - 1 : READ_CHUNK + 1] == b"\r\n"
    # One line break, not two: the bad row is on line 3.
    with pytest.raises(InputFileError, match=r"row 2 has 3 fields but the header has 2 \(line 3\)"):
        _rows(data)


def test_broken_csv_names_the_row():
    with pytest.raises(InputFileError, match=r"row 2 \(line 3\) is not valid CSV: ',' expected after '\"'"):
        _rows(b'id,text\n1,ok\n2,"bad"x",\n3,fine\n')
    # An unclosed quote would otherwise swallow the rest of the file into one text.
    with pytest.raises(InputFileError, match=r"row 2 \(line 5\) is not valid CSV: unexpected end of data"):
        _rows(b'id,text\n1,ok\n2,"never closed\n3,x\n4,y\n')


def test_old_mac_line_endings():
    assert [r.text for r in _rows(b"id,text\r1,a\r2,b\r")] == ["a", "b"]


def test_text_longer_than_csv_default_field_limit():
    long = "word " * 40_000  # 200,000 characters, over csv's default 131,072
    assert _rows(f"id,text\n1,{long}\n".encode())[0].text == long


def test_rows_are_read_lazily():
    class Counting:
        lines = 0

        def __init__(self, data):
            self.data = io.BytesIO(data)

        def __iter__(self):
            for line in self.data:
                Counting.lines += 1
                yield line

    data = b"id,text\n" + b"".join(b"%d,text %d\n" % (i, i) for i in range(100_000))
    rows = iter(CsvInput(Counting(data), "in.csv"))
    next(rows)
    assert Counting.lines < 10


def _checker(**options):
    return RowChecker(
        "in.csv",
        allow_empty=options.pop("allow_empty", False),
        max_request_bytes=options.pop("max_request_bytes", 1000),
        check_ids=options.pop("check_ids", True),
    )


def test_checker_lists_empty_rows_with_count():
    check = _checker()
    rows = [InputRow(n, str(n), "" if n % 3 == 0 else "text") for n in range(1, 31)]
    sent = [check.check(r) for r in rows]
    assert sent.count(False) == 10 and check.failed
    error = check.error()
    assert str(error) == (
        "in.csv: 10 row(s) with an empty text (nothing but whitespace, control or format "
        "characters): row 3, 6, 9, 12, 15, ... (fix them, or pass --allow-empty to write them "
        "unscored)"
    )
    assert error.count == 10 and error.index == 2


@pytest.mark.parametrize("text", ["\x00", "\u200b", "\ufeff", " \u00a0 ", "\u2028", "\u2029\t", "\u0301", "\x1f\x7f"])
def test_checker_counts_texts_with_nothing_visible_as_empty(text):
    check = _checker()
    assert check.check(InputRow(1, "a", text)) is False and check.failed
    allowed = _checker(allow_empty=True)
    assert allowed.check(InputRow(1, "a", text)) is False and not allowed.failed
    assert _checker().check(InputRow(1, "a", text + "x")) is True


def test_checker_reports_an_empty_id_as_empty():
    # One empty id, which the duplicate check never saw.
    check = RowChecker("in.csv", allow_empty=False, max_request_bytes=1000, check_ids=True, id_column="id")
    for number, row_id in enumerate(["a", "", "c"], 1):
        check.check(InputRow(number, row_id, "text"))
    assert check.failed
    assert str(check.error()) == "in.csv: 1 row(s) with an empty id (column 'id'): row 2 (give every row an id)"
    assert check.error().index == 1 and check.error().reason == "empty id"
    # Several (blank counts as empty), next to empty texts: both in one message.
    check = RowChecker("in.csv", allow_empty=False, max_request_bytes=1000, check_ids=True, id_column="key")
    for number, (row_id, text) in enumerate([("", "x"), ("b", " "), ("  ", "y")], 1):
        check.check(InputRow(number, row_id, text))
    message = str(check.error())
    assert message.startswith(
        "in.csv: 2 row(s) with an empty id (column 'key'): row 1, 3 (give every row an id); 1 row(s) with an empty text"
    )
    assert "repeat" not in message
    # --allow-empty is about texts only.
    check = RowChecker("in.csv", allow_empty=True, max_request_bytes=1000, check_ids=True, id_column="id")
    check.check(InputRow(1, "", "x"))
    assert check.failed


def test_checker_allow_empty():
    check = _checker(allow_empty=True)
    assert check.check(InputRow(1, "a", " \t ")) is False
    assert not check.failed


def test_checker_rejects_a_text_too_big_for_a_request():
    check = _checker(max_request_bytes=1000)
    assert check.check(InputRow(1, "a", "x" * 996))
    assert check.check(InputRow(2, "b", "é" * 200))  # 400 bytes
    with pytest.raises(InputFileError, match="row 3: the text is 997 bytes of UTF-8, more than fits in one request"):
        check.check(InputRow(3, "c", "x" * 997))


def test_checker_finds_duplicate_ids():
    check = _checker()
    for number, row_id in enumerate(["a", "b", "a", "c", "b", "a"], 1):
        check.check(InputRow(number, row_id, "t"))
    assert check.duplicate_ids() == (3, [(1, 3), (2, 5), (1, 6)])
    unique = _checker()
    for number in range(1, 1000):
        unique.check(InputRow(number, str(number), "t"))
    assert unique.duplicate_ids() == (0, [])
