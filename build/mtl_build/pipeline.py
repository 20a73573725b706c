"""The build's heavy steps, in order: train, calibrate, export, read the config back, check, score, install."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from multitask_core import files
from multitask_core.served import ServedModel
from multitask_core.text import TextEncoder

from . import calibrate, pbtxt
from .config import ProjectConfig
from .data import LabelledData
from .evaluate import (
    TransformersReference,
    check_graphs,
    choose_recheck_margin,
    format_agreement,
    format_confusion,
    format_precision,
    format_table,
    max_parity_gap,
    score,
    served_precision,
    write_metrics,
)
from .export import install_repository, write_graphs, write_manifest, write_torch_artifacts
from .model_card import write_model_card
from .train import Encoded, Trainer, train


def _calibration(
    config: ProjectConfig, trainer_logits, validation: LabelledData, challenge: LabelledData | None, log
) -> dict[str, dict]:
    """Fit a temperature per task on validation logits; ECE before (T = 1) on validation and challenge."""
    from mtl_client.metrics import classification_report

    out = {}
    for task in config.tasks:
        truth = validation.labels[task.name]
        if not (truth >= 0).any():
            continue
        logits = trainer_logits["validation"][task.name]
        temperature = calibrate.fit_temperature(logits, truth) if config.training.calibrate else 1.0
        labelled = truth >= 0
        entry = {
            "temperature": round(temperature, 4),
            "validation": {
                "before": classification_report(truth[labelled], calibrate.softmax(logits[labelled]), task.labels)[
                    "ece"
                ]
            },
        }
        if challenge is not None and (challenge.labels[task.name] >= 0).any():
            c_truth = challenge.labels[task.name]
            c_labelled = c_truth >= 0
            c_logits = trainer_logits["challenge"][task.name]
            entry["challenge"] = {
                "before": classification_report(
                    c_truth[c_labelled], calibrate.softmax(c_logits[c_labelled]), task.labels
                )["ece"]
            }
        out[task.name] = entry
        log(f"calibration {task.name}: temperature {temperature:.3f}")
    return out


def run_pipeline(
    config: ProjectConfig,
    backbone_dir: Path,
    train_data: LabelledData,
    validation: LabelledData,
    challenge: LabelledData | None,
    output: Path,
    inputs: dict,
    started: float,
    log,
) -> Path:
    encoder_cfg = json.loads((backbone_dir / "config.json").read_text())
    text = TextEncoder(backbone_dir / files.TOKENIZER_FILE, config.backbone.max_tokens)
    model, history = train(config, backbone_dir, encoder_cfg, text, train_data, validation, log)
    train_seconds = time.perf_counter() - started

    scorer = Trainer(config, model, text, train_data, validation, log)
    logits = {"validation": scorer.logits_of(Encoded.of(text, validation.texts))}
    if challenge is not None:
        logits["challenge"] = scorer.logits_of(Encoded.of(text, challenge.texts))
    calibration = _calibration(config, logits, validation, challenge, log)
    for name, entry in calibration.items():
        calibrate.fold_into_head(model.heads[name], entry["temperature"])

    # Export and evaluate in a staging folder, then move into place: no half-written repository.
    output.mkdir(parents=True, exist_ok=True)
    staging = output / f".{config.serving.model_name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        artifacts = write_torch_artifacts(config, model, backbone_dir, staging)
        # The model config as Triton will hand it to model.py: read back through the schema.
        model_config = pbtxt.read_config(staging / pbtxt.CONFIG_FILE)
        reference = ServedModel.open(
            staging,
            model_config,
            verify=False,
            runtime="torch",
            device="cpu",
            precision="float32",
            threads=torch.get_num_threads(),
        )
        texts = validation.texts + (challenge.texts if challenge is not None else [])
        reference_probs = reference.predict(texts).probabilities
        split = len(validation.texts)
        reference_validation = {k: v[:split] for k, v in reference_probs.items()}

        splits = {"validation": slice(0, split)}
        if challenge is not None:
            splits["challenge"] = slice(split, len(texts))

        def accept_int8(quantized) -> tuple[float | None, str]:
            """A plan is kept when, with the smallest float32 recheck margin that does it, its labels equal
            float32's on enough rows of every task, in every split. Returns (that margin or None, what was seen)."""
            probabilities = openvino_probabilities(quantized, reference.text, texts, reference.runtime.task_sizes)
            margin, result = choose_recheck_margin(
                probabilities, reference_probs, splits, config.serving.min_label_agreement
            )
            seen = f"{format_agreement(result)}; recheck margin {result['recheck_margin']:g}"
            return margin, f"{seen} ({result['rechecked_share']:.1%} of rows run again in float32)"

        log("exported the torch artifacts; scored the float32 reference on validation and challenge")
        graph_report = write_graphs(config, model, staging, train_data.texts, accept_int8, log)
        artifacts += graph_report["artifacts"]
        runtimes = graph_report["runtimes"]
        graphs, graph_probs = check_graphs(
            staging,
            model_config,
            [r for r in runtimes if r != "torch"],
            reference_probs,
            texts,
            splits,
            config.serving.min_label_agreement,
            log,
        )
        served = ServedModel.open(staging, model_config, verify=False, device="cpu")
        scored_with = served.runtime.describe()
        # What the server runs here scores the splits: the same probabilities its graph check just computed.
        served_probs = graph_probs.get(served.runtime.name)
        if served_probs is None:  # torch: float32 is the reference itself; another dtype is run here
            float32 = getattr(served.runtime, "dtype", None) == torch.float32
            served_probs = reference_probs if float32 else served.predict(texts).probabilities
        validation_report = score(config, {k: v[:split] for k, v in served_probs.items()}, validation)
        challenge_report = (
            score(config, {k: v[split:] for k, v in served_probs.items()}, challenge) if challenge is not None else None
        )
        for name, entry in calibration.items():
            entry["validation"]["after"] = validation_report["tasks"][name]["ece"]
            if challenge_report is not None and "challenge" in entry:
                entry["challenge"]["after"] = challenge_report["tasks"][name]["ece"]
        log("checked the graphs; comparing with transformers and the reduced precisions")
        parity = max_parity_gap(
            reference, TransformersReference(staging, backbone_dir, config.backbone.normalize), validation.texts[:64]
        )
        precision = served_precision(staging, model_config, config, reference_validation, validation.texts)
        card = {
            "model_name": config.serving.model_name,
            "max_tokens": config.backbone.max_tokens,
            "tasks": {t.name: list(t.labels) for t in config.tasks},
            "training": {
                "mode": config.training.mode,
                "seed": config.training.seed,
                "train_rows": len(train_data.texts),
                "train_file": str(config.data.train),
                "seconds": round(train_seconds, 1),
                "machine": _machine(),
                "history": history,
            },
            "scored_with": scored_with,
            "validation_file": str(config.data.validation),
            "validation": validation_report,
            "challenge_file": str(config.data.challenge) if challenge is not None else None,
            "challenge": challenge_report,
            "calibration": calibration,
            "graphs": graphs,
            "quantization": graph_report.get("openvino"),
            "parity_max_abs_diff": parity,
            "served_precision": precision,
            "expected_label_share": expected_shares(config, {k: v[:split] for k, v in served_probs.items()}),
        }
        card["build_seconds"] = round(time.perf_counter() - started, 1)
        write_metrics(staging, card)
        write_model_card(staging, card)
        write_manifest(staging, [*artifacts, files.METRICS_FILE, files.MODEL_CARD_FILE], inputs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    version_dir = install_repository(staging, output, config.serving.model_name)

    print(format_table(validation_report, f"validation ({len(validation.texts):,} rows, scored with {scored_with})"))
    if challenge_report is not None:
        print(format_table(challenge_report, f"challenge ({len(challenge.texts):,} rows, never trained on)"))
    print(format_confusion(validation_report))
    for name, entry in calibration.items():
        parts = [f"validation {entry['validation']['before']:.3f} -> {entry['validation']['after']:.3f}"]
        if "challenge" in entry:
            parts.append(f"challenge {entry['challenge']['before']:.3f} -> {entry['challenge']['after']:.3f}")
        print(f"calibration {name}: T = {entry['temperature']:.3f}; ECE {'; '.join(parts)}")
    print(f"served-vs-transformers max |Δprob| (float32): {parity:.2e}")
    print(format_precision(precision))
    print(f"wrote {version_dir} in {time.perf_counter() - started:.1f}s")
    return version_dir


def openvino_probabilities(
    model, text: TextEncoder, texts: list[str], task_sizes: dict[str, int]
) -> dict[str, np.ndarray]:
    """An in-memory OpenVINO model's probabilities, chunked as the served runtime chunks them."""
    from multitask_core.runtimes import OpenVINORuntime, tokens_per_forward

    runtime = OpenVINORuntime(model, task_sizes, torch.get_num_threads(), tokens_per_forward(torch.device("cpu")))
    parts = [runtime.run(text.encode(texts[i : i + 256])) for i in range(0, len(texts), 256)]
    return {name: np.concatenate([p[name] for p in parts]) for name in task_sizes}


def expected_shares(config: ProjectConfig, probabilities: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The share of each predicted label on the validation split: the label mix the server is checked against."""
    shares = {}
    for task in config.tasks:
        predicted = probabilities[task.name].argmax(1)
        counts = np.bincount(predicted, minlength=len(task.labels))
        shares[task.name] = {
            label: round(float(c / max(1, len(predicted))), 4) for label, c in zip(task.labels, counts)
        }
    return shares


def _machine() -> str:
    from .cli import machine

    return machine()
