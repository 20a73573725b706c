"""Throughput against p99 latency: one line per series, each point labelled with its concurrency."""

from __future__ import annotations

from pathlib import Path

from .analyzer import Measurement


def plot(series: dict[str, list[Measurement]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for label, points in series.items():
        points = sorted(points, key=lambda m: m.concurrency)
        xs = [m.p99_us / 1000 for m in points]
        ys = [m.sentences_per_s for m in points]
        ax.plot(xs, ys, marker="o", label=label)
        for m, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"c={m.concurrency}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (sentences/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    latencies = [m.p99_us for points in series.values() for m in points if m.p99_us > 0]
    # 1- and 64-sentence requests differ in latency by orders of magnitude on a CPU.
    if latencies and max(latencies) / min(latencies) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
