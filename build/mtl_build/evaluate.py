"""Score the exported (served) model: validation and challenge sets, per register, calibration, every graph."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mtl_client.metrics import classification_report
from multitask_core import files
from multitask_core.runtimes import near_ties
from multitask_core.served import ServedModel
from multitask_core.spec import pick_dtype

from .config import ProjectConfig
from .data import LabelledData
from .errors import BuildError

# metrics.json key: the GPU's float16 computed on the CPU (see served_precision)
FLOAT16_ON_CPU = "float16_on_cpu"


class GraphCheckError(BuildError):
    """An exported graph disagrees with the float32 model on too many labels."""


def score(config: ProjectConfig, probabilities: dict[str, np.ndarray], data: LabelledData) -> dict:
    """Per task: the metrics of mtl_client.metrics over the rows labelled for it; and per register."""
    report = {"tasks": {}, "registers": {}}
    for task in config.tasks:
        truth = data.labels[task.name]
        labelled = truth >= 0
        report["tasks"][task.name] = (
            classification_report(truth[labelled], probabilities[task.name][labelled], task.labels)
            if labelled.any()
            else {"rows": 0, "labels": list(task.labels)}
        )
    if data.registers:
        registers = np.array(data.registers)
        for register in sorted(set(data.registers)):
            rows = registers == register
            report["registers"][register] = {}
            for task in config.tasks:
                truth = data.labels[task.name]
                labelled = rows & (truth >= 0)
                if labelled.any():
                    full = classification_report(truth[labelled], probabilities[task.name][labelled], task.labels)
                    report["registers"][register][task.name] = {
                        k: full[k] for k in ("rows", "accuracy", "macro_f1", "macro_recall", "ece")
                    }
    return report


class TransformersReference(torch.nn.Module):
    """transformers' BertModel + mean pooling + L2 norm + the heads, holding an exported model's weights."""

    def __init__(self, version_dir: Path, backbone_dir: Path, normalize: bool = True):
        super().__init__()
        import transformers
        from safetensors.torch import load_file

        transformers.utils.logging.set_verbosity_error()
        self.bert = transformers.AutoModel.from_pretrained(
            str(backbone_dir), local_files_only=True, add_pooling_layer=False
        )
        state = load_file(str(version_dir / files.WEIGHTS_FILE))
        prefix = "encoder."
        self.bert.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        heads = {k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")}
        names = sorted({key.split(".")[0] for key in heads})
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(*heads[f"{n}.weight"].T.shape) for n in names})
        self.heads.load_state_dict(heads)
        self.normalize = normalize
        self.eval()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        embedding = torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
        return {name: torch.softmax(head(embedding), -1) for name, head in self.heads.items()}


def max_parity_gap(served: ServedModel, reference: TransformersReference, texts: list[str]) -> float:
    """Largest |served − transformers| probability over the texts (one padded batch)."""
    batch = served.encode(texts)
    expected = reference(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
    actual = served.run(batch)
    return max(float(np.abs(actual[name] - expected[name].numpy()).max()) for name in actual)


def agreement(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    return {
        "rows": len(next(iter(reference.values()))),
        "label_agreement": {
            name: round(float((candidate[name].argmax(1) == reference[name].argmax(1)).mean()), 4) for name in reference
        },
        "max_abs_diff": float(max(np.abs(candidate[name] - reference[name]).max() for name in reference)),
    }


def split_agreement(
    candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray], splits: dict[str, slice]
) -> dict:
    """agreement() on all rows, plus per split ("validation", "challenge"): the bar holds on each split."""
    whole = agreement(candidate, reference)
    whole["splits"] = {
        name: agreement({k: v[rows] for k, v in candidate.items()}, {k: v[rows] for k, v in reference.items()})
        for name, rows in splits.items()
    }
    return whole


def below_bar(result: dict, bar: float) -> list[str]:
    """The (split, task) pairs of a split_agreement() result below `bar`, as "topic 99.43% of 1,593 validation rows"."""
    return [
        f"{task} {value:.2%} of {split['rows']:,} {name} rows"
        for name, split in result["splits"].items()
        for task, value in split["label_agreement"].items()
        if value < bar
    ]


# Margins tried for the int8 graph's float32 recheck of near ties, smallest first; 0 = no recheck.
RECHECK_MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


def choose_recheck_margin(
    candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray], splits: dict[str, slice], bar: float
) -> tuple[float | None, dict]:
    """The smallest margin whose recheck (the near-tie rows of the int8 `candidate` given the float32 answer, as
    the served OpenVINO runtime does) keeps `bar` on every task of every split. Returns (margin, or None when even
    the largest fails, and the agreement at that margin with the share of rows it runs again)."""
    for margin in RECHECK_MARGINS:
        again = near_ties(candidate, margin)
        rechecked = {name: np.where(again[:, None], reference[name], probs) for name, probs in candidate.items()}
        result = split_agreement(rechecked, reference, splits)
        result |= {"recheck_margin": margin, "rechecked_share": round(float(again.mean()), 4)}
        if not below_bar(result, bar):
            return margin, result
    return None, result


def _timed(served: ServedModel, texts: list[str]) -> tuple[dict[str, np.ndarray], float]:
    started = time.perf_counter()
    probabilities = served.predict(texts).probabilities
    return probabilities, len(texts) / max(time.perf_counter() - started, 1e-9)


def check_graphs(
    version_dir: Path,
    model_config: dict,
    runtimes: list[str],
    reference: dict[str, np.ndarray],
    texts: list[str],
    splits: dict[str, slice],
    bar: float,
    log,
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Each exported graph against the float32 torch `reference` on `texts`: label agreement per task and per
    split, the largest probability difference and the speed (sentences/s, in-process, this machine's threads).
    Raises GraphCheckError when a graph agrees on fewer than `bar` of the rows of a task in any split. Returns the
    results and each graph's probabilities (the build scores with the served one instead of running it again)."""
    threads = os.cpu_count() or 1
    results, probabilities_of = {}, {}
    for runtime in runtimes:
        served = ServedModel.open(
            version_dir, model_config, verify=False, runtime=runtime, device="cpu", precision="float32", threads=threads
        )
        probabilities, speed = _timed(served, texts)
        result = split_agreement(probabilities, reference, splits) | {
            "sentences_per_s": round(speed, 1),
            "runtime": served.runtime.describe(),
        }
        if getattr(served.runtime, "margin", 0) > 0:  # the int8 graph with its float32 recheck of near ties
            result["rechecked_share"] = round(served.runtime.rows_rechecked / max(served.runtime.rows_seen, 1), 4)
        results[runtime], probabilities_of[runtime] = result, probabilities
        log(f"graph {runtime}: {format_agreement(result)}; {speed:.0f} sentences/s in-process")
        low = below_bar(result, bar)
        if low:
            raise GraphCheckError(
                f"the {runtime} graph gives the float32 labels on only {', '.join(low)} "
                f"(serving.min_label_agreement is {bar:.1%}); nothing was installed. Set serving.runtime to torch, "
                "or report this with the build log"
            )
    return results, probabilities_of


def served_precision(
    version_dir: Path, model_config: dict, config: ProjectConfig, reference: dict[str, np.ndarray], texts: list[str]
) -> dict:
    """The dtype the torch runtime picks on this machine's CPU and, when it is not float32, how its labels
    compare with the float32 `reference`. With precision auto, also float16 (what a GPU serves) run with this
    CPU's kernels: a proxy until the GPU check (python -m mtl_tools.gpu) measures it on a GPU, whose kernels round
    differently."""
    dtype = pick_dtype(torch.device("cpu"), config.serving.precision)
    result = {"precision": config.serving.precision, "cpu_dtype": str(dtype).removeprefix("torch.")}

    def run(precision_dtype: torch.dtype) -> dict:
        served = ServedModel.open(
            version_dir, model_config, verify=False, runtime="torch", device="cpu", threads=os.cpu_count() or 1
        )
        served.runtime.model.to(precision_dtype)
        return agreement(served.predict(texts).probabilities, reference)

    if dtype != torch.float32:
        result |= run(dtype)
    if config.serving.precision == "auto":
        result[FLOAT16_ON_CPU] = run(torch.float16)
    return result


def format_agreement(result: dict) -> str:
    def shares(part: dict) -> str:
        return ", ".join(f"{name} {value:.2%}" for name, value in part["label_agreement"].items())

    splits = result.get("splits", {})
    if splits:
        per_split = "; ".join(f"{name} ({part['rows']:,} rows) {shares(part)}" for name, part in splits.items())
        return f"labels equal to float32: {per_split}; max |Δprob| {result['max_abs_diff']:.2e}"
    rows = result["rows"]
    return f"labels equal to float32 on {rows} rows: {shares(result)}; max |Δprob| {result['max_abs_diff']:.2e}"


def format_precision(result: dict) -> str:
    lines = [f"torch on this CPU: {result['cpu_dtype']} (serving.precision {result['precision']})"]
    if "label_agreement" in result:
        lines[0] += f"; {format_agreement(result)}"
    if FLOAT16_ON_CPU in result:
        lines.append(
            f"float16 (served on a GPU), run here with CPU kernels: {format_agreement(result[FLOAT16_ON_CPU])}"
        )
    return "\n".join(lines)


def format_table(report: dict, title: str) -> str:
    lines = [f"{title}", f"  {'task':<12} {'rows':>5} {'accuracy':>9} {'macro-F1':>9} {'macro-rec':>9} {'ECE':>7}"]
    for name, s in report["tasks"].items():
        if s["rows"]:
            lines.append(
                f"  {name:<12} {s['rows']:>5} {s['accuracy']:>9.4f} {s['macro_f1']:>9.4f} "
                f"{s['macro_recall']:>9.4f} {s['ece']:>7.4f}"
            )
        else:
            lines.append(f"  {name:<12} {0:>5}  (zero-shot, no labelled rows)")
    if report.get("registers"):
        lines.append(f"  by register: {'register':<13}" + "".join(f" {t + ' acc/mF1':>22}" for t in report["tasks"]))
        for register, tasks in report["registers"].items():
            cells = "".join(
                f" {tasks[t]['rows']:>6}: {tasks[t]['accuracy']:.3f}/{tasks[t]['macro_f1']:.3f}"
                if t in tasks
                else f" {'-':>22}"
                for t in report["tasks"]
            )
            lines.append(f"               {register:<13}{cells}")
    return "\n".join(lines)


def format_confusion(report: dict) -> str:
    lines = []
    for name, s in report["tasks"].items():
        if not s["rows"]:
            continue
        width = max(len(label) for label in s["labels"]) + 2
        lines.append(f"{name}: confusion matrix (rows = true, columns = predicted)")
        lines.append(" " * width + "".join(f"{label[: width - 1]:>{width}}" for label in s["labels"]))
        for label, counts in zip(s["labels"], s["confusion_matrix"]):
            lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in counts))
    return "\n".join(lines)


def write_metrics(version_dir: Path, card: dict) -> None:
    (version_dir / files.METRICS_FILE).write_text(json.dumps(card, indent=2) + "\n")
