"""What a load test leaves behind: combined CSV, PNG, summary JSON, and the sweep's table."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

from ..machine import commit, machine, versions
from .analyzer import Measurement, PerfAnalyzer, RunSettings
from .plot import plot


def metadata(analyzer: PerfAnalyzer, settings: RunSettings, texts: list[str], source: str) -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "commit": commit(),
        "perf_analyzer": {"binary": str(analyzer.binary), "version": analyzer.version()},
        "settings": {
            "measurement_ms": settings.measurement_ms,
            "max_trials": settings.max_trials,
            "stability_percent": settings.stability_percent,
            "protocol": "grpc",
        },
        "input": {
            "source": source,
            "sentences": len(texts),
            "mean_characters": round(sum(map(len, texts)) / len(texts), 1),
        },
    }


def _where(meta: dict) -> str:
    m = meta["machine"]
    return f"perf_analyzer {meta['perf_analyzer']['version']}, {m['cpu_count']} CPUs" + (
        f", {m['gpu']}" if m.get("gpu") else ""
    )


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_run(measurements: list[Measurement], out_dir: Path, meta: dict, model: str) -> list[Path]:
    """perf.csv (one row per workload and concurrency), perf.png, summary.json."""
    rows = [m.as_row() for m in measurements]
    sizes = sorted({m.sentences_per_request for m in measurements})
    series = {
        f"{size}-sentence requests": [m for m in measurements if m.sentences_per_request == size] for size in sizes
    }
    paths = [
        write_csv(rows, out_dir / "perf.csv"),
        plot(series, out_dir / "perf.png", f"{model} over gRPC, {_where(meta)}"),
    ]
    (out_dir / "summary.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    return paths + [out_dir / "summary.json"]


def sweep_table(rows: list[dict]) -> str:
    """Markdown: one line per variant, workload and concurrency; best throughput first within a workload."""
    lines = [
        "| variant | instances | threads | tokens/forward | queue delay (µs) | preferred | sentences/request | "
        "concurrency | sentences/s | requests/s | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["sentences_per_request"], -r["sentences_per_s"])):
        lines.append(
            f"| {row['variant']} | {row['instance_count']} | {row['threads']} | {row['tokens_per_forward']} | "
            f"{row['max_queue_delay_us']} | {row['preferred_batch_sizes']} | {row['sentences_per_request']} | "
            f"{row['concurrency']} | {row['sentences_per_s']:.1f} | {row['requests_per_s']:.1f} | "
            f"{row['p50_us'] / 1000:.1f} | {row['p99_us'] / 1000:.1f} |"
        )
    return "\n".join(lines)


def write_sweep(
    rows: list[dict],
    out_dir: Path,
    meta: dict,
    base_settings: dict,
    model: str,
    errors: list[str] = (),
    notes: list[str] = (),
) -> str:
    """sweep.csv, sweep.md, sweep_b<SENTENCES>.png per workload, summary.json; returns the table (and the
    failed runs under it)."""
    write_csv(rows, out_dir / "sweep.csv")
    for size in sorted({r["sentences_per_request"] for r in rows}):
        series: dict[str, list[Measurement]] = {}
        for row in rows:
            if row["sentences_per_request"] == size:
                fields = {k: row[k] for k in Measurement.__dataclass_fields__}
                series.setdefault(row["variant"], []).append(Measurement(**fields))
        plot(
            series,
            out_dir / f"sweep_b{size}.png",
            f"{size}-sentence requests: batching variants of {model}, {_where(meta)}",
        )
    table = sweep_table(rows)
    if notes:
        table += "\n\nNotes:\n" + "\n".join(f"- {note}" for note in notes)
    if errors:
        table += "\n\nFailed runs (not in the table):\n" + "\n".join(f"- {error}" for error in errors)
    header = (
        f"# Serving layouts of {model}: {meta['machine'].get('cpu_summary', meta['machine']['cpu'])}, commit "
        f"{meta.get('commit', 'unknown')}, {meta['date']}\n\nBase config: {base_settings}. Load average at the "
        f"start: {meta['machine']['load_average']}. Input: {meta['input']}.\n\n"
    )
    (out_dir / "sweep.md").write_text(header + table + "\n")
    (out_dir / "summary.json").write_text(
        json.dumps(
            {**meta, "base_config": base_settings, "results": rows, "errors": list(errors), "notes": list(notes)},
            indent=2,
        )
        + "\n"
    )
    return table
