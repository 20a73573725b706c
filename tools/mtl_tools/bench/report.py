"""What a benchmark run leaves behind: <label>.json and <label>.md in the results folder, and with --write-docs
the run's section of docs/benchmarks.md (between this label's markers; the rest of the page stays as it is)."""

from __future__ import annotations

import json
from pathlib import Path

NOISY_SHARE = 0.05  # other processes' CPU share above which a figure is marked as not clean


def _rate(entry: dict | None) -> str:
    return f"{entry['sentences_per_s']:,.1f}" if entry else "—"


def _quality(value: dict | None) -> str:
    if not value:
        return ""
    if "mean_cosine" in value:
        return f"cosine {value['mean_cosine']:.4f} (min {value['min_cosine']:.4f})"
    tasks = ", ".join(f"{task} {share:.2%}" for task, share in value.items() if task not in ("all_tasks", "rows"))
    return f"labels = float32: {tasks}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(report: dict) -> str:
    """Speed: the median sentences/s per workload, over the fastest peer, CPU cost and the repetitions' spread."""
    names = list(report["workloads"])
    header = ["contender"] + [f"{w}: sentences/s" for w in names] + [f"{w}: × fastest peer" for w in names]
    header += ["sentences per CPU-s", "spread of the repetitions"]
    rows = []
    for name, info in report["contenders"].items():
        entry = report["results"].get(name, {})
        ratios = []
        for workload in names:
            ratio = report["ratios"].get(workload, {})
            fastest = ratio.get("fastest_peer_sentences_per_s")
            value = entry[workload]["sentences_per_s"] / fastest if fastest and workload in entry else None
            ratios.append(f"{value:.2f}×" if value is not None else "—")
        rows.append(
            [f"**{name}**" if info["kind"] == "product" else name]
            + [_rate(entry.get(w)) for w in names]
            + ratios
            + [
                " / ".join(str(entry[w]["sentences_per_cpu_s"]) if w in entry else "—" for w in names),
                " / ".join(f"{entry[w]['spread']:.0%}" if w in entry else "—" for w in names),
            ]
        )
    return _table(header, rows)


def quality_table(report: dict) -> str:
    names = list(report["workloads"])
    rows = [[name] + [_quality(report["quality"][name].get(w)) or "—" for w in names] for name in report["quality"]]
    return _table(["contender"] + names, rows)


def targets(report: dict) -> list[str]:
    lines = []
    for workload, row in report["ratios"].items():
        for name, value in row["products"].items():
            if value["target"] is None:
                continue
            verdict = "MET" if value["met"] else "NOT MET"
            lines.append(
                f"{workload}: {name} {value['ratio']:.2f}× the fastest peer ({row['fastest_peer']}, "
                f"{row['fastest_peer_sentences_per_s']:,.1f} sentences/s); target ≥ {value['target']}×: {verdict}"
            )
    return lines


def markdown(report: dict) -> str:
    m = report["machine"]
    shares = {
        name: max(entry[w]["others_share"] for w in entry)
        for name, entry in report["results"].items()
        if name in report["contenders"] and entry
    }
    noisy = max(shares.values(), default=0) > NOISY_SHARE
    lines = [
        f"### {report['label']}: {report['date']}, commit {report['commit']}",
        "",
        f"- machine: {m['cpu_summary']}{'; GPU ' + m['gpu'] if m.get('gpu') else ''}; {m['platform']}",
        f"- load average (1, 5, 15 min) before: {m['load_average']}, after: {m.get('load_after')}; the most CPU other "
        "processes took while a contender ran: "
        + (", ".join(f"{k} {v:.0%}" for k, v in shares.items()) or "n/a")
        + (" — **the machine was shared with other work: these figures are not clean**" if noisy else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- every contender: {report['threads']} threads (the server: its own instances and threads), "
        f"median of {report['repeats']} repetitions, interleaved; device {report['device']}",
        "- workloads: "
        + "; ".join(
            f"{w['name']}: {w['count']:,} sentences from {w['source']}, mean "
            f"{w['mean_characters']} characters / {w.get('mean_tokens', '?')} tokens, "
            f"fingerprint {w['fingerprint']}"
            for w in report["workloads"].values()
        ),
        f"- model repository: {report['model_repository']} ({report['model_config']})",
        f"- command: `{report['command']}`",
        "",
        results_table(report),
        "",
    ]
    lines += [f"- {line}" for line in targets(report)]
    lines += ["", "What each contender ran:", ""] + [
        f"- {name}: {info['detail']}" for name, info in report["contenders"].items()
    ]
    if report["quality"]:
        lines += [
            "",
            "Quality against float32 (peers: embedding cosine to sentence-transformers float32; product: labels "
            "equal to the served model's torch float32):",
            "",
            quality_table(report),
        ]
    made = report.get("peer_files", {}).get("seconds")
    if made:
        lines += [
            "",
            "Peer graphs made (once, cached in "
            + report["peer_files"]["folder"]
            + "): "
            + ", ".join(f"{name} {seconds} s" for name, seconds in made.items()),
        ]
    perf = report["results"].get("perf")
    if perf:
        lines += [
            "",
            "perf_analyzer against the same server (best per request size): "
            + "; ".join(
                f"{size}-sentence requests: {b['sentences_per_s']:,.1f} sentences/s at concurrency {b['concurrency']} "
                f"(p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms)"
                for size, b in perf["best"].items()
            ),
        ]
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines)


def update_doc(doc: Path, label: str, text: str) -> None:
    begin, end = f"<!-- mtl_tools.bench:{label}:begin -->", f"<!-- mtl_tools.bench:{label}:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current, encoding="utf-8")


def write_results(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{report['label']}.json", out / f"{report['label']}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report) + "\n", encoding="utf-8")
    return json_path, md_path
