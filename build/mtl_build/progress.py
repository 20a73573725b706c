"""Progress of long build steps on stderr: done/total, elapsed and an ETA, at most every few seconds."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, label: str, log, every_s: float = 10.0):
        self.total, self.label, self.log, self.every_s = max(total, 1), label, log, every_s
        self.done = 0
        self.started = self.shown = time.monotonic()

    def step(self, detail: str = "", count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.shown < self.every_s and self.done < self.total:
            return
        self.shown = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        suffix = f", {detail}" if detail else ""
        self.log(
            f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
            f"{duration(elapsed)} elapsed, ~{duration(eta)} left{suffix}"
        )

    def close(self) -> float:
        return time.monotonic() - self.started
