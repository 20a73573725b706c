"""Score the exported (served) model on the validation split and write the model card."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from .config import ProjectConfig
from .data import LabelledData
from .serving_core import core
from .train import EagerMultiTask

METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
# metrics.json key: the GPU's float16 computed on the CPU (see served_precision)
FLOAT16_ON_CPU = "float16_on_cpu"


@dataclass
class ServedModel:
    """The exported artifacts loaded exactly as model.py loads them, on the CPU (float32 unless told)."""

    model: "core.MultiTaskModel"
    tokenizer: object
    spec: "core.ServingSpec"

    @classmethod
    def load(cls, version_dir: Path, config: ProjectConfig, dtype: torch.dtype = torch.float32) -> "ServedModel":
        core.verify_artifacts(version_dir)
        spec = core.ServingSpec(
            tuple(core.TaskSpec(t.name, tuple(t.labels)) for t in config.tasks),
            config.backbone.max_tokens,
            config.backbone.normalize,
            "cpu",
            config.serving.precision,
        )
        model = core.load_model(version_dir, spec, torch.device("cpu"), dtype)
        return cls(model, core.load_tokenizer(version_dir / core.TOKENIZER_FILE, spec.max_tokens), spec)

    def probabilities(self, texts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {t.name: [] for t in self.spec.tasks}
        for start in range(0, len(texts), batch_size):
            batch = core.tokenize(self.tokenizer, texts[start : start + batch_size], self.spec.max_tokens)
            for name, probs in core.predict_probabilities(self.model, batch, torch.device("cpu")).items():
                parts[name].append(probs)
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def max_parity_gap(served: ServedModel, eager: EagerMultiTask, texts: list[str]) -> float:
    """Largest |served − transformers| probability over the texts (one padded batch)."""
    batch = core.tokenize(served.tokenizer, texts, served.spec.max_tokens)
    with torch.inference_mode():
        eager_logits = eager.eval()(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
    served_probs = core.predict_probabilities(served.model, batch, torch.device("cpu"))
    return max(
        float(np.abs(served_probs[name] - torch.softmax(logits, -1).numpy()).max()) for name, logits in eager_logits.items()
    )


def dtype_agreement(version_dir: Path, config: ProjectConfig, dtype: torch.dtype, reference: dict[str, np.ndarray],
                    texts: list[str]) -> dict:
    """How often the served model in `dtype` (on this CPU) gives the float32 `reference` labels, and its largest
    probability difference."""
    reduced = ServedModel.load(version_dir, config, dtype).probabilities(texts)
    return {"rows": len(texts),
            "label_agreement": {name: round(float((reduced[name].argmax(1) == reference[name].argmax(1)).mean()), 4)
                                for name in reference},
            "max_abs_diff": float(max(np.abs(reduced[name] - reference[name]).max() for name in reference))}


def served_precision(version_dir: Path, config: ProjectConfig, reference: dict[str, np.ndarray],
                     texts: list[str]) -> dict:
    """The dtype model.py picks on this machine's CPU and, when it is not float32, how its labels compare with
    the float32 `reference`. With precision auto, also float16 (what a GPU serves) run with this CPU's kernels:
    a proxy until gpu/check.py measures it on a GPU, whose kernels round differently."""
    dtype = core.pick_dtype(torch.device("cpu"), config.serving.precision)
    result = {"precision": config.serving.precision, "cpu_dtype": str(dtype).removeprefix("torch.")}
    if dtype != torch.float32:
        result |= dtype_agreement(version_dir, config, dtype, reference, texts)
    if config.serving.precision == "auto":
        result[FLOAT16_ON_CPU] = dtype_agreement(version_dir, config, torch.float16, reference, texts)
    return result


def _agreement_text(result: dict) -> str:
    agreement = ", ".join(f"{name} {value:.2%}" for name, value in result["label_agreement"].items())
    return f"labels equal to float32 on {result['rows']} validation rows: {agreement}; max |Δprob| {result['max_abs_diff']:.2e}"


def format_precision(result: dict) -> str:
    lines = [f"served precision on this CPU: {result['cpu_dtype']} (serving.precision {result['precision']})"]
    if "label_agreement" in result:
        lines[0] += f"; {_agreement_text(result)}"
    if FLOAT16_ON_CPU in result:
        lines.append(f"float16 (served on a GPU), run here with CPU kernels: {_agreement_text(result[FLOAT16_ON_CPU])}")
    return "\n".join(lines)


def evaluate(config: ProjectConfig, probabilities: dict[str, np.ndarray], data: LabelledData) -> dict:
    report = {}
    for task in config.tasks:
        truth = data.labels[task.name]
        labelled = truth >= 0
        if not labelled.any():
            report[task.name] = {"labels": list(task.labels), "rows": 0}
            continue
        predicted = probabilities[task.name].argmax(axis=1)[labelled]
        truth = truth[labelled]
        label_ids = list(range(len(task.labels)))
        report[task.name] = {
            "labels": list(task.labels),
            "rows": int(labelled.sum()),
            "accuracy": round(float(accuracy_score(truth, predicted)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro", labels=label_ids, zero_division=0)), 4),
            # rows: true label, columns: predicted label, both in config order
            "confusion_matrix": confusion_matrix(truth, predicted, labels=label_ids).tolist(),
        }
    return report


def format_table(report: dict) -> str:
    lines = [f"{'task':<12} {'rows':>5} {'accuracy':>9} {'macro-F1':>9}"]
    for name, scores in report.items():
        if scores["rows"]:
            lines.append(f"{name:<12} {scores['rows']:>5} {scores['accuracy']:>9.4f} {scores['macro_f1']:>9.4f}")
        else:
            lines.append(f"{name:<12} {0:>5} {'(zero-shot, no labelled rows)':>20}")
    for name, scores in report.items():
        if not scores["rows"]:
            continue
        width = max(len(label) for label in scores["labels"]) + 2
        lines.append(f"\n{name}: confusion matrix (rows = true, columns = predicted)")
        lines.append(" " * width + "".join(f"{label[:width - 1]:>{width}}" for label in scores["labels"]))
        for label, counts in zip(scores["labels"], scores["confusion_matrix"]):
            lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in counts))
    return "\n".join(lines)


def write_model_card(version_dir: Path, card: dict) -> None:
    (version_dir / METRICS_FILE).write_text(json.dumps(card, indent=2) + "\n")
    training = card["training"]
    text = [
        f"# Model card: {card['model_name']}",
        "",
        "Shared encoder sentence-transformers/all-MiniLM-L6-v2 (mean pooling, L2-normalised 384-d embedding, "
        f"token budget {card['max_tokens']}) with one linear head per task.",
        "",
        f"- Training mode: `{training['mode']}`, seed {training['seed']}, {training['train_rows']} training rows, "
        f"build time {training['seconds']:.1f} s on {training['machine']}",
        f"- Served vs transformers parity on validation texts: max |Δprob| = {card['parity_max_abs_diff']:.2e}",
        *(f"- {line}" for line in format_precision(card["served_precision"]).splitlines()),
        "- On a GPU (float16 with the GPU's kernels): measured by gpu/check.py, see docs/gpu.md",
        "",
        f"## Validation ({card['validation_file']})",
        "",
        "```",
        format_table(card["validation"]),
        "```",
        "",
        "Data and labelling rules: data/README.md.",
    ]
    (version_dir / MODEL_CARD_FILE).write_text("\n".join(text) + "\n")
