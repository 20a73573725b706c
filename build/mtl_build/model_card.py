"""MODEL_CARD.md from the build's metrics: what the model is for, how well it does and where it fails."""

from __future__ import annotations

from pathlib import Path

from multitask_core import files

from .evaluate import format_agreement, format_precision

# What the data and the challenge set showed to go wrong; kept in words here, measured in the tables.
KNOWN_FAILURES = [
    "Sarcasm without a marker (no emoji, no 'oh great') is often read at face value.",
    "Neutral reports of dramatic events (deaths, crashes, record profits) are sometimes scored as polar, "
    "more often in short social posts than in news text.",
    "Topic: company news that is mostly about a product (a recall, a launch) sits between finance and tech; "
    "stories about games sit between entertainment and tech.",
    "Texts with no topic (sports, politics, daily life) still get one of the three topics: the topic head "
    "has no 'none' label, so read its score as a confidence, not a yes.",
    "Languages other than English, and code-switched text, were not in the training data.",
]


def _task_rows(report: dict) -> list[str]:
    rows = ["| task | rows | accuracy | macro-F1 | macro-recall | ECE |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["tasks"].items():
        if s["rows"]:
            rows.append(
                f"| {name} | {s['rows']:,} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} | "
                f"{s['macro_recall']:.3f} | {s['ece']:.3f} |"
            )
        else:
            rows.append(f"| {name} | 0 | zero-shot head, no labelled rows | | | |")
    return rows


def _register_rows(report: dict) -> list[str]:
    tasks = list(report["tasks"])
    if not report.get("registers"):
        return []
    rows = [
        "",
        "| register | " + " | ".join(f"{t} rows | {t} acc | {t} macro-F1" for t in tasks) + " |",
        "|---|" + "---:|" * (3 * len(tasks)),
    ]
    for register, scores in report["registers"].items():
        cells = []
        for task in tasks:
            s = scores.get(task)
            cells += [f"{s['rows']:,}", f"{s['accuracy']:.3f}", f"{s['macro_f1']:.3f}"] if s else ["0", "–", "–"]
        rows.append(f"| {register} | " + " | ".join(cells) + " |")
    return rows


def _recall_rows(report: dict) -> list[str]:
    rows = []
    for name, s in report["tasks"].items():
        if s["rows"]:
            per_class = ", ".join(f"{label} {v['recall']:.2f}" for label, v in s["per_class"].items())
            rows.append(f"- {name} recall per label: {per_class}")
    return rows


def write_model_card(version_dir: Path, card: dict) -> None:
    training = card["training"]
    lines = [
        f"# Model card: {card['model_name']}",
        "",
        "Shared encoder sentence-transformers/all-MiniLM-L6-v2 (mean pooling, L2-normalised 384-d embedding, "
        f"at most {card['max_tokens']} tokens per text) with one linear head per task: "
        + "; ".join(f"**{name}** ({', '.join(labels)})" for name, labels in card["tasks"].items())
        + ".",
        "",
        "## Intended use",
        "",
        "Sorting short English texts (social posts, headlines and news leads, reviews, forum replies, support "
        "messages, press releases) by topic and by the writer's sentiment, for routing, dashboards and "
        "aggregate monitoring. Sentiment means the writer's own stance: a neutral report of a sad or happy event "
        "is neutral (data/GUIDELINES.md). Not for decisions about individual people, and not for languages other "
        "than English. Check it on your own labelled data with `mtl-client evaluate` before relying on it.",
        "",
        "## Training",
        "",
        f"- Mode `{training['mode']}`, seed {training['seed']}, {training['train_rows']:,} training rows "
        f"({training['train_file']}); recipe in config.yaml, chosen on validation (docs/training.md)",
        f"- Training took {training['seconds']:.0f} s, the whole build {card['build_seconds']:.0f} s, "
        f"on {training['machine']}",
    ]
    if training.get("history"):
        lines.append(
            "- Validation mean macro-F1 by epoch: "
            + ", ".join(
                f"{h['epoch']}: {h['validation']['mean_macro_f1']:.3f}"
                for h in training["history"]
                if "validation" in h
            )
        )
    lines += [
        "",
        f"## Validation ({card['validation_file']}, written with the training data; used for model selection)",
        "",
        *_task_rows(card["validation"]),
        *_register_rows(card["validation"]),
        "",
        *_recall_rows(card["validation"]),
    ]
    if card.get("challenge"):
        lines += [
            "",
            f"## Challenge set ({card['challenge_file']}: written apart, never used for training or selection)",
            "",
            *_task_rows(card["challenge"]),
            *_register_rows(card["challenge"]),
            "",
            *_recall_rows(card["challenge"]),
        ]
    calibration = card.get("calibration")
    if calibration:
        lines += [
            "",
            "## Calibration",
            "",
            "One temperature per task, fitted on the validation split and folded into the head; the served "
            "probabilities are the calibrated ones. Expected calibration error (10 bins, top label):",
            "",
            "| task | temperature | validation before | validation after | challenge before | challenge after |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, c in calibration.items():
            ch = c.get("challenge", {})
            lines.append(
                f"| {name} | {c['temperature']:.3f} | {c['validation']['before']:.3f} | "
                f"{c['validation']['after']:.3f} | {ch.get('before', float('nan')):.3f} | "
                f"{ch.get('after', float('nan')):.3f} |"
            )
    lines += [
        "",
        "## Known failure kinds",
        "",
        *(f"- {item}" for item in KNOWN_FAILURES),
        "",
        "## Served runtimes",
        "",
        f"- Scores above come from the {card['scored_with']} runtime, what `mtl-serve` runs on this machine.",
        f"- Served (plain torch) vs transformers on validation texts: max |Δprob| = {card['parity_max_abs_diff']:.2e}",
    ]
    for runtime, check in card.get("graphs", {}).items():
        rechecked = f"; {check['rechecked_share']:.1%} of rows rechecked" if "rechecked_share" in check else ""
        lines.append(
            f"- {runtime} ({check['runtime']}): {format_agreement(check)}; "
            f"{check['sentences_per_s']:.0f} sentences/s in-process{rechecked}"
        )
    quantization = card.get("quantization") or {}
    if quantization.get("plan"):
        lines.append(
            f"- int8 graph: {quantization['plan']}, calibrated on {quantization['calibration_texts']} training "
            f"texts; rows whose two best labels are within {quantization['recheck_margin']:g} are run again in "
            "float32 (docs/training.md)"
        )
    lines += [
        *(f"- {line}" for line in format_precision(card["served_precision"]).splitlines()),
        "- On a GPU (float16 with the GPU's kernels): measured by the GPU check (python -m mtl_tools.gpu, docs/gpu.md)",
        "",
        "Data, registers and labelling rules: data/README.md and data/GUIDELINES.md.",
    ]
    (version_dir / files.MODEL_CARD_FILE).write_text("\n".join(lines) + "\n")
