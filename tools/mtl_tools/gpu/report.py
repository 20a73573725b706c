"""What the GPU check brings back: the targets met or not, the parity table, the benchmark and sweep tables."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path


def targets(
    bench: dict | None, sweep_rows: list[dict], served: dict | None, served_dtype: str = "float16"
) -> list[str]:
    rows = list(sweep_rows)
    if bench:
        rows += (bench.get("results", {}).get("perf", {}) or {}).get("rows", [])
    lines = []
    big = [r for r in rows if r["sentences_per_request"] == 64]
    if big:
        best = max(big, key=lambda r: r["sentences_per_s"])
        lines.append(
            f"64-sentence requests: best {best['sentences_per_s']:,.0f} sentences/s "
            f"(concurrency {best['concurrency']}, p99 {best['p99_us'] / 1000:.1f} ms"
            f"{', ' + best['variant'] if 'variant' in best else ''}); "
            f"target >= 120,000: {'MET' if best['sentences_per_s'] >= 120000 else 'NOT MET'}"
        )
    one = [r for r in rows if r["sentences_per_request"] == 1]
    if one:
        within = [r for r in one if r["p99_us"] <= 25000]
        best = max(within or one, key=lambda r: r["requests_per_s"])
        lines.append(
            f"1-sentence requests: best {best['requests_per_s']:,.0f} requests/s at p99 {best['p99_us'] / 1000:.1f} ms "
            f"(concurrency {best['concurrency']}{', ' + best['variant'] if 'variant' in best else ''}"
            f"{'' if within else '; no run had p99 <= 25 ms'}); target >= 25,000 at p99 <= 25 ms: "
            f"{'MET' if within and best['requests_per_s'] >= 25000 else 'NOT MET'}"
        )
    if served:
        v = served["all_tasks"]
        lines.append(
            f"served {served_dtype} labels = fp32 CPU reference labels on {v['label_agreement']:.2%} of {v['rows']} "
            f"validation rows ({v['differing_rows']} differ); target >= 99.5%: "
            f"{'MET' if v['label_agreement'] >= 0.995 else 'NOT MET'}"
        )
    return lines


def parity_table(report: dict) -> str:
    entries = [(f"in-process {dtype}", value) for dtype, value in (report.get("parity_in_process") or {}).items()]
    if report.get("parity_served"):
        entries.append((f"served ({report['parity_served']['model']})", report["parity_served"]))
    lines = [
        "| path | validation rows with every label equal | differing | max abs prob diff per task |",
        "|---|---:|---:|---|",
    ]
    for name, value in entries:
        every = value["all_tasks"]
        diffs = ", ".join(
            f"{task} {v['max_abs_prob_diff']}" for task, v in value.items() if task not in ("all_tasks", "model")
        )
        lines.append(
            f"| {name} | {every['label_agreement']:.2%} of {every['rows']} | {every['differing_rows']} | {diffs} |"
        )
    return "\n".join(lines)


def write_outputs(out: Path, results: Path, report: dict, bench: dict | None) -> None:
    """At most 8 files come back from the device: summary.md/json, three PNGs, results.tar.gz (the rest)."""
    lines = [
        "# GPU check",
        "",
        f"- environment: {report['env']}",
        f"- carried weights: {report['carry']}",
        f"- took {report['seconds']} s",
        "",
        "## Targets",
        "",
    ] + [f"- {t}" for t in report["targets"]]
    lines += ["", "## Parity: labels against the fp32 CPU reference of the real weights", "", parity_table(report)]
    bench_md = results / "benchmarks" / "device.md"
    if bench or bench_md.is_file():
        lines += [
            "",
            "## Benchmarks (python -m mtl_tools.bench on this machine)",
            "",
            bench_md.read_text() if bench_md.is_file() else json.dumps((bench or {}).get("results"), indent=1),
        ]
    if report.get("sweep_table"):
        lines += ["", "## Serving-layout sweep (python -m mtl_tools.perf sweep equivalent)", "", report["sweep_table"]]
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    if report.get("sweep_failed_runs"):
        lines += ["", "Failed sweep runs:"] + [f"- {e}" for e in report["sweep_failed_runs"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for source, name in (
        (results / "benchmarks" / "device-perf" / "perf.png", "perf.png"),
        (results / "sweep" / "sweep_b64.png", "sweep_b64.png"),
        (results / "sweep" / "sweep_b1.png", "sweep_b1.png"),
    ):
        if source.is_file():
            shutil.copyfile(source, out / name)
    with tarfile.open(out / "results.tar.gz", "w:gz") as archive:
        archive.add(results, arcname="results")
    shutil.rmtree(results)
