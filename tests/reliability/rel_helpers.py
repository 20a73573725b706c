"""Helpers of the reliability suite: the counts it reports, test data, subprocess runs, memory of a server."""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from mtl_serve.procs import SHM_FOLDER

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
WORDS = [
    "the",
    "market",
    "rallied",
    "after",
    "strong",
    "quarterly",
    "earnings",
    "from",
    "the",
    "bank",
    "while",
    "the",
    "new",
    "phone",
    "update",
    "drained",
    "batteries",
    "and",
    "fans",
    "cheered",
    "the",
    "band's",
    "joyful",
    "album",
    "at",
    "a",
    "packed",
    "concert",
    "yesterday",
]


@dataclass
class Counts:
    """What the suite did, printed at the end of the run (pytest_terminal_summary below)."""

    inputs: int = 0  # requests, CLI runs, generated examples and start-ups fed to the system under test
    probes: int = 0  # of those inputs: canary inferences the servers' watchdogs sent
    faults: int = 0  # process and environment faults: kills, stops, restarts, signals, corrupt files, busy ports
    rows_checked: int = 0  # rows whose delivery was checked (load responses, CLI outputs)
    rows_lost: int = 0  # of those: missing, duplicated, reordered or with the wrong row count
    notes: list[str] = field(default_factory=list)

    def rows(self, sent: int, delivered_ok: int) -> None:
        self.rows_checked += sent
        self.rows_lost += sent - delivered_ok

    def canaries(self, server) -> None:
        """Count the canary inferences a LocalTriton's watchdog sent (call when done with the server)."""
        self.inputs += server.canaries_sent
        self.probes += server.canaries_sent


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


def server_memory(server) -> dict[str, int]:
    """Bytes held by a LocalTriton's Triton: RSS of tritonserver, RSS of its stubs, its /dev/shm regions."""
    stubs = server.stub_pids()
    return {
        "tritonserver": psutil.Process(server.pid).memory_info().rss,
        "stubs": sum(psutil.Process(pid).memory_info().rss for pid in stubs),
        "shm": sum((SHM_FOLDER / name).stat().st_size for name in server.shm_regions if (SHM_FOLDER / name).exists()),
    }


def mib(memory: dict[str, int]) -> str:
    return ", ".join(f"{name} {size / MIB:,.0f}" for name, size in memory.items()) + " MiB"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
