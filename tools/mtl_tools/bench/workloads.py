"""The fixed sentence sets every contender gets: real sentences of data/, same order, same count.

The unique non-empty texts of data/train.csv, validation.csv and challenge.csv are split at their median
length in characters: `short` is drawn from the shorter half, `long` from the longer one, each with a fixed
seed (repeating only when a half has fewer texts than asked for). Without data/, a fixed list of generated
headline-like sentences stands in for both. No contender caches results, so a repeat costs as much as a new row.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from ..paths import DATA

DATA_FILES = (DATA / "train.csv", DATA / "validation.csv", DATA / "challenge.csv")
CALIBRATION_FILE = DATA / "train.csv"
DEFAULT_COUNT = 2000
NAMES = ("short", "long")
SEED = 20240


@dataclass(frozen=True)
class Workload:
    name: str
    texts: list[str]
    source: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.texts)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "count": len(self.texts),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "mean_characters": round(sum(map(len, self.texts)) / max(1, len(self.texts)), 1),
        }


def read_texts(path: Path, column: str = "text") -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row[column] for row in csv.DictReader(handle) if (row.get(column) or "").strip()]


def data_texts(files=DATA_FILES) -> list[str]:
    """The unique non-empty texts of `files`, in file order."""
    return list(dict.fromkeys(text for path in files for text in read_texts(path)))


def generated_texts(count: int = 2000) -> list[str]:
    subjects = [
        "The studio",
        "Investors",
        "The new phone",
        "Critics",
        "The central bank",
        "Our team",
        "The film",
        "Shareholders",
        "The startup",
        "Fans",
        "My laptop",
        "The streaming service",
    ]
    verbs = [
        "praised",
        "dumped",
        "launched",
        "criticised",
        "raised rates on",
        "released",
        "loved",
        "sold off",
        "shipped",
        "ignored",
        "could not stop talking about",
        "quietly cancelled",
    ]
    objects = [
        "the quarterly earnings report",
        "a chip with twice the battery life",
        "the season finale of the drama",
        "bonds after the inflation surprise",
        "an update that broke every plugin",
        "the soundtrack nobody expected to like",
        "shares of the streaming company",
        "the merger proposal",
    ]
    tails = [
        "",
        " yesterday",
        " after months of rumours",
        ", and the reaction online was mixed",
        " despite a weak outlook for the rest of the year and rising costs",
    ]
    rng = random.Random(SEED)
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}." for _ in range(count)
    ]


def draw(base: list[str], count: int, seed: int = SEED) -> list[str]:
    """`count` texts of `base` in a fixed shuffled order; every text once before any repeats."""
    rng = random.Random(seed)
    order = list(range(len(base)))
    texts: list[str] = []
    while len(texts) < count:
        rng.shuffle(order)
        texts.extend(base[i] for i in order[: count - len(texts)])
    return texts


def split_by_length(texts: list[str]) -> tuple[list[str], list[str], int]:
    """(shorter half, longer half, the median length in characters that splits them)."""
    median = sorted(map(len, texts))[len(texts) // 2]
    return [t for t in texts if len(t) < median], [t for t in texts if len(t) >= median], median


def workloads(count: int = DEFAULT_COUNT, names=NAMES, files=DATA_FILES) -> list[Workload]:
    base = data_texts(files)
    if not base:
        generated = generated_texts()
        return [Workload(name, draw(generated, count), "generated fallback list (no data/ files)") for name in names]
    short, long, median = split_by_length(base)
    where = " + ".join(f"data/{Path(f).name}" for f in files if Path(f).is_file())
    halves = {
        "short": (short, f"{where}: the {len(short):,} texts under {median} characters"),
        "long": (long, f"{where}: the {len(long):,} texts of {median} characters or more"),
    }
    return [Workload(name, draw(halves[name][0], count), halves[name][1]) for name in names]


def calibration_texts(count: int = 300, path: Path = CALIBRATION_FILE) -> list[str]:
    """The texts the static-int8 peer calibrates on: a fixed draw from the training split."""
    texts = read_texts(path) or generated_texts()
    return draw(texts, min(count, len(texts)), seed=SEED + 1)


def fingerprint(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def write_csv(texts: list[str], path: Path) -> Path:
    """id,text: the form `mtl-client predict` and `python -m mtl_tools.perf` read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows((f"b{i:05d}", text) for i, text in enumerate(texts))
    return path
