"""The labelled data's own checks, and the one-off assembly of the writers' files into the three splits.

`python -m mtl_build.dataset check` verifies data/train.csv, validation.csv and challenge.csv: columns, labels,
registers, no duplicate or near-duplicate text within or across the splits, and the balance of the cells.
`python -m mtl_build.dataset assemble WRITTEN...` merged the writers' files (data/README.md says how); it
is kept so that the split can be re-derived, and it is deterministic.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from scipy import sparse

COLUMNS = ["text", "topic", "sentiment", "register"]
TOPICS = ("entertainment", "finance", "tech", "")
SENTIMENTS = ("negative", "neutral", "positive")
REGISTERS = ("social", "headline", "news_lead", "review", "forum", "support_chat", "press")
# Two texts are near-duplicates above this token Jaccard similarity (shared words / all words).
NEAR_DUPLICATE = 0.6
VALIDATION_SHARE = 0.1
SEED = 13
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Row:
    text: str
    topic: str
    sentiment: str
    register: str
    source: str = ""


def read_rows(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            if None in raw:
                raise ValueError(f"{path}, row {line}: more fields than the header")
            row = Row(
                raw["text"].strip(), raw["topic"].strip(), raw["sentiment"].strip(), raw["register"].strip(), path.stem
            )
            problems = ["text is empty" for _ in [0] if not row.text]
            problems += [f"topic {row.topic!r}" for _ in [0] if row.topic not in TOPICS]
            problems += [f"sentiment {row.sentiment!r}" for _ in [0] if row.sentiment not in SENTIMENTS]
            problems += [f"register {row.register!r}" for _ in [0] if row.register not in REGISTERS]
            if "\n" in row.text or "\r" in row.text:
                problems.append("text holds a line break")
            if problems:
                raise ValueError(f"{path}, row {line}: {'; '.join(problems)}")
            rows.append(row)
    return rows


def write_rows(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([r.text, r.topic, r.sentiment, r.register] for r in rows)


def key(text: str) -> str:
    """What makes two texts the same text: case and spacing aside."""
    return " ".join(text.lower().split())


def _token_matrix(texts: list[str]) -> sparse.csr_matrix:
    vocabulary: dict[str, int] = {}
    indptr, indices = [0], []
    for text in texts:
        tokens = {vocabulary.setdefault(t, len(vocabulary)) for t in _WORD.findall(text.lower())}
        indices.extend(sorted(tokens))
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(texts), max(1, len(vocabulary))))


def near_duplicate_pairs(
    texts: list[str], threshold: float = NEAR_DUPLICATE, block: int = 2000
) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for every pair of texts whose token Jaccard similarity exceeds `threshold`."""
    matrix = _token_matrix(texts)
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    pairs = []
    for start in range(0, len(texts), block):
        shared = (matrix[start : start + block] @ matrix.T).tocoo()
        i, j, inter = shared.row + start, shared.col, shared.data
        keep = i < j
        i, j, inter = i[keep], j[keep], inter[keep]
        union = sizes[i] + sizes[j] - inter
        similarity = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        hits = similarity > threshold
        pairs.extend(zip(i[hits].tolist(), j[hits].tolist(), similarity[hits].tolist()))
    return pairs


def deduplicate(rows: list[Row]) -> tuple[list[Row], list[tuple[Row, Row, float]]]:
    """Keep the first of every exact or near-duplicate group, in the order given; return kept and dropped pairs."""
    dropped: list[tuple[Row, Row, float]] = []
    removed = set()
    for i, j, similarity in sorted(near_duplicate_pairs([r.text for r in rows]), key=lambda p: (p[0], p[1])):
        if i in removed or j in removed:
            continue
        removed.add(j)
        dropped.append((rows[i], rows[j], similarity))
    first_of: dict[str, int] = {}
    for index, row in enumerate(rows):
        if index in removed:
            continue
        if key(row.text) in first_of:
            removed.add(index)
            dropped.append((rows[first_of[key(row.text)]], row, 1.0))
        else:
            first_of[key(row.text)] = index
    return [r for i, r in enumerate(rows) if i not in removed], dropped


def split_validation(rows: list[Row], share: float = VALIDATION_SHARE, seed: int = SEED) -> tuple[list[Row], list[Row]]:
    """A fixed stratified split: `share` of every register x topic x sentiment cell goes to validation."""
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str, str], list[int]] = {}
    for index, row in enumerate(rows):
        cells.setdefault((row.register, row.topic, row.sentiment), []).append(index)
    validation = set()
    for cell in sorted(cells):
        members = cells[cell]
        count = int(round(len(members) * share))
        validation.update(rng.choice(members, size=count, replace=False).tolist())
    train = [r for i, r in enumerate(rows) if i not in validation]
    held = [r for i, r in enumerate(rows) if i in validation]
    order_train, order_val = rng.permutation(len(train)), rng.permutation(len(held))
    return [train[i] for i in order_train], [held[i] for i in order_val]


def cell_counts(rows: list[Row]) -> Counter:
    return Counter((r.topic or "-", r.sentiment) for r in rows)


def check(folder: Path) -> list[str]:
    """Problems with the committed splits, as lines (empty when they are fine)."""
    problems = []
    splits = {name: read_rows(folder / f"{name}.csv") for name in ("train", "validation", "challenge")}
    everything = [(name, row) for name, rows in splits.items() for row in rows]
    seen: dict[str, str] = {}
    for name, row in everything:
        if key(row.text) in seen:
            problems.append(f"duplicate text in {seen[key(row.text)]} and {name}: {row.text[:60]!r}")
        seen.setdefault(key(row.text), name)
    for i, j, similarity in near_duplicate_pairs([row.text for _, row in everything]):
        a, b = everything[i], everything[j]
        if key(a[1].text) != key(b[1].text):
            problems.append(
                f"near-duplicates ({similarity:.2f}) in {a[0]} and {b[0]}: {a[1].text[:50]!r} / {b[1].text[:50]!r}"
            )
    return problems


@click.group()
def main() -> None:
    """Check or assemble the labelled data."""


@main.command("check")
@click.option("--data", "folder", type=click.Path(path_type=Path, file_okay=False), default="data", show_default=True)
def check_command(folder: Path) -> None:
    """Verify the committed splits; exit 1 listing every problem."""
    problems = check(folder)
    for line in problems:
        click.echo(line)
    click.echo(f"{len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


@main.command("assemble")
@click.argument("written", nargs=-1, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--challenge", "challenge_files", multiple=True, type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default="data", show_default=True)
def assemble_command(written: tuple[Path, ...], challenge_files: tuple[Path, ...], out: Path) -> None:
    """Merge WRITTEN training files and --challenge files into train/validation/challenge.csv.

    Challenge rows come first, so a training row that repeats one is the row dropped."""
    challenge_rows = [r for path in challenge_files for r in read_rows(path)]
    pool = [r for path in written for r in read_rows(path)]
    kept, dropped = deduplicate(challenge_rows + pool)
    challenge_keys = {key(r.text) for r in challenge_rows}
    challenge = [r for r in kept if r.source in {p.stem for p in challenge_files}]
    train_pool = [
        r for r in kept if r.source not in {p.stem for p in challenge_files} and key(r.text) not in challenge_keys
    ]
    train, validation = split_validation(train_pool)
    rng = np.random.default_rng(SEED)
    challenge = [challenge[i] for i in rng.permutation(len(challenge))]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation), ("challenge", challenge)):
        write_rows(out / f"{name}.csv", rows)
        click.echo(f"{name}: {len(rows):,} rows")
    click.echo(f"dropped {len(dropped):,} duplicate or near-duplicate rows")
    for first, second, similarity in dropped[:40]:
        click.echo(
            f"  {similarity:.2f} [{second.source}] {second.text[:70]!r}  ~  [{first.source}] {first.text[:70]!r}"
        )


if __name__ == "__main__":
    main()
