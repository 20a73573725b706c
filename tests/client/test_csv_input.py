"""The CLI's CSV reader and row checks: encodings, CSV syntax, headers, empty and oversized texts, ids."""
import io

import pytest

from mtl_client.csv_input import CsvInput, InputFileError, InputRow, RowChecker


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
    rows = _rows(b"id,text\r\n1,a\r\n\r\n2,\"b\r\nc\"\r\n\r\n")
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
    with pytest.raises(InputFileError, match="row 2 .line 3. has 1 field.s. but the header has 2: no value for column 'text'"):
        _rows(b"id,text\n1,ok\n2\n")


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
    return RowChecker("in.csv", allow_empty=options.pop("allow_empty", False),
                      max_request_bytes=options.pop("max_request_bytes", 1000), check_ids=options.pop("check_ids", True))


def test_checker_lists_empty_rows_with_count():
    check = _checker()
    rows = [InputRow(n, str(n), "" if n % 3 == 0 else "text") for n in range(1, 31)]
    sent = [check.check(r) for r in rows]
    assert sent.count(False) == 10 and check.failed
    error = check.error()
    assert str(error) == ("in.csv: 10 row(s) with an empty or whitespace-only text: row 3, 6, 9, 12, 15, ... "
                          "(fix them, or pass --allow-empty to write them unscored)")
    assert error.count == 10 and error.index == 2


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
