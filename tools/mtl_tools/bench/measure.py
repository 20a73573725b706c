"""Timing one call of a contender: wall seconds, the CPU seconds it cost, and how busy the rest of the machine was.

Wall-clock figures on a shared machine move with other people's jobs, so every figure comes with the CPU
that processes other than ours used meanwhile (`others_share`): a run with a high share is not clean.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """user+system CPU seconds of running processes (e.g. Triton and its stubs), from /proc."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """This process (all its threads) and its exited children."""
    return sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )


def _busy_cpu() -> float:
    """CPU seconds the whole machine spent busy since boot (all but idle and iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    seconds: float
    cpu_s: float  # ours: this process, its children and the server processes
    others_share: float  # other processes' CPU as a fraction of the machine's capacity meanwhile


def timed(function: Callable[[], object], server_pids: Callable[[], list[int]] = list) -> tuple[object, Timing]:
    """Run `function` once; its result and its Timing."""
    pids = server_pids()
    start = (time.perf_counter(), _own_cpu(), process_cpu_seconds(pids), _busy_cpu())
    result = function()
    end = (time.perf_counter(), _own_cpu(), process_cpu_seconds(pids), _busy_cpu())
    seconds = end[0] - start[0]
    ours = (end[1] - start[1]) + (end[2] - start[2])
    capacity = seconds * (os.cpu_count() or 1)
    others = max(0.0, (end[3] - start[3]) - ours) / capacity if capacity > 0 else 0.0
    return result, Timing(seconds, ours, min(1.0, others))


def summarize(timings: list[Timing], sentences: int) -> dict:
    """The median of the repetitions (sentences/s, CPU per sentence), and every repetition as measured."""
    rates = [sentences / t.seconds for t in timings]
    per_cpu = [sentences / t.cpu_s for t in timings if t.cpu_s > 0]
    return {
        "sentences": sentences,
        "repetitions": len(timings),
        "sentences_per_s": round(statistics.median(rates), 1),
        "sentences_per_cpu_s": round(statistics.median(per_cpu), 1) if per_cpu else None,
        "spread": round((max(rates) - min(rates)) / statistics.median(rates), 3),
        "others_share": round(max(t.others_share for t in timings), 3),
        "runs": [{k: round(v, 3) for k, v in asdict(t).items()} for t in timings],
    }
