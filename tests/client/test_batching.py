"""plan_batches and the streaming batch builder: limits, order, greedy packing, and pass-through items."""

import random

import pytest

from mtl_client import InvalidInputError, plan_batches
from mtl_client.batching import ELEMENT_OVERHEAD, check_texts, element_cost, encode_text, stream_batches


def _check_plan(sizes, max_rows, max_bytes, ranges):
    # Contiguous, in order, covering everything.
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(len(sizes)))
    for position, (start, stop) in enumerate(ranges):
        assert 1 <= stop - start <= max_rows
        assert sum(s + ELEMENT_OVERHEAD for s in sizes[start:stop]) <= max_bytes
        if position + 1 < len(ranges):
            # Greedy: the next item would have broken a limit.
            nxt = sizes[stop] + ELEMENT_OVERHEAD
            assert stop - start == max_rows or sum(s + ELEMENT_OVERHEAD for s in sizes[start:stop]) + nxt > max_bytes


def test_plan_splits_on_rows_and_bytes():
    assert plan_batches([1] * 10, max_rows=4, max_bytes=1000) == [(0, 4), (4, 8), (8, 10)]
    # 5 + 4 bytes each: two fit in 20, a third does not.
    assert plan_batches([5] * 5, max_rows=100, max_bytes=20) == [(0, 2), (2, 4), (4, 5)]
    assert plan_batches([], max_rows=4, max_bytes=100) == []


def test_plan_measures_text_as_utf8():
    # "é" is 2 bytes, "€" is 3: costs 2+4 and 3+4.
    assert element_cost("é") == 6 and element_cost("€") == 7 and element_cost(b"abc") == 7
    assert plan_batches(["é", "€", "é"], max_rows=10, max_bytes=13) == [(0, 2), (2, 3)]


def test_plan_rejects_a_single_item_too_big_and_names_it():
    with pytest.raises(InvalidInputError) as info:
        plan_batches([10, 10, 1000, 10], max_rows=8, max_bytes=100)
    assert info.value.index == 2
    assert "texts[2]" in str(info.value) and "1,000 bytes" in str(info.value)
    # Exactly at the limit is fine.
    assert plan_batches([96], max_rows=1, max_bytes=100) == [(0, 1)]


def test_plan_refuses_nonsense_limits():
    with pytest.raises(ValueError):
        plan_batches([1], max_rows=0, max_bytes=100)
    with pytest.raises(ValueError):
        plan_batches([1], max_rows=1, max_bytes=3)


def test_plan_fuzz():
    rng = random.Random(1234)
    for _ in range(2000):
        max_rows = rng.randint(1, 12)
        max_bytes = rng.randint(ELEMENT_OVERHEAD + 1, 300)
        sizes = [rng.choice([0, 1, rng.randint(0, max_bytes - ELEMENT_OVERHEAD)]) for _ in range(rng.randint(0, 60))]
        ranges = plan_batches(sizes, max_rows, max_bytes)
        _check_plan(sizes, max_rows, max_bytes, ranges)


def test_stream_batches_match_plan_batches_fuzz():
    rng = random.Random(99)
    for _ in range(500):
        max_rows, max_bytes = rng.randint(1, 8), rng.randint(20, 200)
        texts = ["x" * rng.randint(1, max_bytes - ELEMENT_OVERHEAD) for _ in range(rng.randint(0, 40))]
        streamed = [
            (b.sent[0], b.sent[-1] + 1) for b in stream_batches(((None, t) for t in texts), max_rows, max_bytes)
        ]
        assert streamed == plan_batches(texts, max_rows, max_bytes)


def test_stream_batches_pass_through_items_keep_their_place_and_are_bounded():
    items = [("a", "one"), ("b", None), ("c", "two"), ("d", None), ("e", None), ("f", "three")]
    batches = list(stream_batches(items, max_rows=2, max_bytes=1000))
    assert [tag for b in batches for tag in b.tags] == list("abcdef")
    assert [b.sent for b in batches] == [[0, 2], [5]]
    assert [b.encoded for b in batches] == [[b"one", b"two"], [b"three"]]
    # A long run of unsent items is cut into batches of max_items, with nothing to send.
    many = [(i, None) for i in range(100)]
    batches = list(stream_batches(many, max_rows=4, max_bytes=1000, max_items=16))
    assert max(len(b.tags) for b in batches) == 16 and not any(b.sent for b in batches)
    assert [tag for b in batches for tag in b.tags] == list(range(100))


def test_stream_batches_is_lazy():
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i, f"text {i}"

    batches = stream_batches(source(), max_rows=10, max_bytes=10_000)
    first = next(batches)
    assert first.sent == list(range(10)) and len(pulled) == 11  # one item read ahead to close the batch


def test_stream_batches_names_the_bad_item():
    items = [(None, "fine"), (None, "also fine"), (None, "   ")]
    with pytest.raises(InvalidInputError) as info:
        list(stream_batches(items, max_rows=10, max_bytes=1000))
    assert info.value.index == 2 and "texts[2]" in str(info.value)


def test_text_checks():
    assert encode_text(0, "héllo") == "héllo".encode()
    for bad, reason in (
        (b"bytes", "expected a str"),
        (None, "expected a str"),
        ("", "empty"),
        ("\t \n", "empty"),
        ("\ud800", "UTF-8"),
    ):
        with pytest.raises(InvalidInputError, match=reason):
            encode_text(7, bad)


def test_check_texts_lists_every_empty_text():
    texts = ["ok", "", "fine", " ", *["good"] * 20, *[""] * 12]
    with pytest.raises(InvalidInputError) as info:
        check_texts(texts)
    error = info.value
    assert error.count == 14 and error.index == 1
    assert error.indices[:3] == (1, 3, 24) and len(error.indices) == 10
    assert str(error).startswith("14 empty text(s) (nothing but whitespace, control or format characters)")
    assert "at index 1, 3, 24," in str(error)
    assert check_texts(["a", "b"]) == [b"a", b"b"]
