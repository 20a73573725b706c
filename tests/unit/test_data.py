"""The committed labelled data: columns, labels, registers, no duplicates across splits, balanced cells."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from mtl_build import dataset

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
RAW = yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture(scope="module")
def splits():
    return {name: dataset.read_rows(DATA / f"{name}.csv") for name in ("train", "validation", "challenge")}


def test_the_splits_have_the_promised_sizes_and_columns(splits):
    assert len(splits["train"]) >= 12_000
    assert len(splits["challenge"]) >= 1_500
    assert len(splits["validation"]) >= 1_000
    for name in ("train", "validation", "challenge"):
        header = (DATA / f"{name}.csv").read_text(encoding="utf-8").splitlines()[0]
        assert header.split(",") == dataset.COLUMNS


def test_labels_match_the_config(splits):
    labels = {task["name"]: set(task["labels"]) for task in RAW["tasks"]}
    for rows in splits.values():
        assert {r.topic for r in rows} - {""} <= labels["topic"]
        assert {r.sentiment for r in rows} <= labels["sentiment"]


def test_no_duplicate_or_near_duplicate_text_within_or_across_splits():
    assert dataset.check(DATA) == []


def test_every_register_and_cell_is_represented_and_balanced(splits):
    for name, rows in splits.items():
        registers = Counter(r.register for r in rows)
        assert set(registers) == set(dataset.REGISTERS), name
        cells = dataset.cell_counts(rows)
        # Each topic (and no-topic) x sentiment cell holds a real share: none below half of an even split.
        even = len(rows) / len(cells)
        assert len(cells) == 12 and min(cells.values()) >= 0.5 * even, (name, cells)
    train = Counter(r.sentiment for r in splits["train"])
    assert min(train.values()) / max(train.values()) >= 0.5  # neutral is a first-class class, not a flood


def test_validation_is_a_stratified_share_of_each_register(splits):
    for register in dataset.REGISTERS:
        train = sum(r.register == register for r in splits["train"])
        held = sum(r.register == register for r in splits["validation"])
        assert 0.07 <= held / (train + held) <= 0.13, register


def test_near_duplicates_are_found_and_the_first_is_kept():
    rows = [
        dataset.Row("Bank of England holds rates at 5.25%", "finance", "neutral", "headline", "a"),
        dataset.Row("Bank of England holds interest rates at 5.25%", "finance", "neutral", "social", "b"),
        dataset.Row("THE BANK of england holds rates at 5.25%", "finance", "neutral", "social", "c"),
        dataset.Row("The new phone's battery is dreadful", "tech", "negative", "review", "d"),
    ]
    kept, dropped = dataset.deduplicate(rows)
    assert [r.source for r in kept] == ["a", "d"]
    assert {second.source for _, second, _ in dropped} == {"b", "c"}


def test_split_is_deterministic_and_keeps_every_row():
    rows = [
        dataset.Row(f"text number {i} about item {i * 7}", "tech", ["negative", "neutral", "positive"][i % 3], "social")
        for i in range(300)
    ]
    train_a, val_a = dataset.split_validation(rows)
    train_b, val_b = dataset.split_validation(rows)
    assert train_a == train_b and val_a == val_b
    assert sorted(r.text for r in train_a + val_a) == sorted(r.text for r in rows)
    assert len(val_a) == 30


@pytest.mark.parametrize(
    "line, message",
    [
        ("hello,sports,neutral,social", "topic 'sports'"),
        ("hello,tech,angry,social", "sentiment 'angry'"),
        ("hello,tech,neutral,blog", "register 'blog'"),
        (",tech,neutral,social", "text is empty"),
        ("a,b,tech,neutral,social", "more fields than the header"),
    ],
)
def test_a_bad_row_is_named(tmp_path, line, message):
    path = tmp_path / "x.csv"
    path.write_text("text,topic,sentiment,register\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        dataset.read_rows(path)
    assert "row 2" in str(error.value)
