"""Helpers of the reliability suite: the counts it reports, test data, subprocess runs."""
from __future__ import annotations

import csv
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def configured_instances() -> int:
    """serving.instance_count of the project's config: one python-backend stub process per instance."""
    from mtl_build.config import load_config

    return load_config(ROOT / "config.yaml").serving.instance_count


INSTANCES = configured_instances()
WORDS = ("the market rallied after strong quarterly earnings from the bank while the new phone update "
         "drained batteries and fans cheered the band's joyful album at a packed concert yesterday").split()


@dataclass
class Counts:
    """What the suite did, printed at the end of the run (pytest_terminal_summary below)."""

    inputs: int = 0  # requests, CLI runs, generated examples and start-ups fed to the system under test
    faults: int = 0  # process and environment faults: kills, restarts, signals, corrupt files, busy ports
    rows_checked: int = 0  # rows whose delivery was checked (load responses, CLI outputs)
    rows_lost: int = 0  # of those: missing, duplicated, reordered or with the wrong row count
    notes: list[str] = field(default_factory=list)

    def rows(self, sent: int, delivered_ok: int) -> None:
        self.rows_checked += sent
        self.rows_lost += sent - delivered_ok


COUNTS = Counts()


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def long_text(rng: random.Random, chars: int = 5000) -> str:
    text = ""
    while len(text) < chars:
        text += sentence(rng, 20) + ". "
    return text[:chars]


def write_csv(path: Path, rows: int, seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    data = [(f"row-{i:05d}", sentence(rng)) for i in range(rows)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(data)
    return data


def read_output(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    return target


def run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
