"""The fixed sentence set every benchmark contender gets: real labelled sentences, same order, same count.

The project's data/train.csv and data/validation.csv (1,962 rows today) are read in file order, shuffled
with a fixed seed, and repeated to the requested count; without them a fixed list of generated
headline-like sentences stands in. No contender caches results, so repeats cost the same as new rows.
"""
from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = (ROOT / "data" / "train.csv", ROOT / "data" / "validation.csv")
DEFAULT_COUNT = 5000
SEED = 20240


def _from_data(files=DATA_FILES) -> list[str]:
    texts = []
    for path in files:
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            texts.extend(row["text"] for row in csv.DictReader(handle) if (row.get("text") or "").strip())
    return texts


def _fallback() -> list[str]:
    subjects = ["The studio", "Investors", "The new phone", "Critics", "The central bank", "Our team", "The film",
                "Shareholders", "The startup", "Fans", "My laptop", "The streaming service"]
    verbs = ["praised", "dumped", "launched", "criticised", "raised rates on", "released", "loved", "sold off",
             "shipped", "ignored", "could not stop talking about", "quietly cancelled"]
    objects = ["the quarterly earnings report", "a chip with twice the battery life", "the season finale of the drama",
               "bonds after the inflation surprise", "an update that broke every plugin",
               "the soundtrack nobody expected to like", "shares of the streaming company", "the merger proposal"]
    tails = ["", " yesterday", " after months of rumours", ", and the reaction online was mixed",
             " despite a weak outlook for the rest of the year and rising costs"]
    rng = random.Random(SEED)
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}." for _ in range(2000)]


def benchmark_sentences(count: int = DEFAULT_COUNT, files=DATA_FILES) -> tuple[list[str], str]:
    """`count` sentences and where they came from (for the report)."""
    base = _from_data(files)
    source = f"data/train.csv + data/validation.csv ({len(base)} rows)" if base else "generated fallback list (2000 rows)"
    base = base or _fallback()
    rng = random.Random(SEED)
    order = list(range(len(base)))
    texts = []
    while len(texts) < count:
        rng.shuffle(order)
        texts.extend(base[i] for i in order[: count - len(texts)])
    return texts, source


def fingerprint(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def write_csv(texts: list[str], path: Path) -> Path:
    """id,text: the form `mtl-client predict` and `python -m perf` read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows((f"b{i:05d}", text) for i, text in enumerate(texts))
    return path
