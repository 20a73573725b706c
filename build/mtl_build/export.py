"""Write the Triton model repository: config.pbtxt, weights, graphs, tokenizer, manifest, and the code beside them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from multitask_core import files
from multitask_core.encoder import ExportedGraph, MultiTaskModel
from multitask_core.spec import INPUT_NAME, TRUNCATED_NAME
from multitask_core.text import TextEncoder

from . import pbtxt
from .config import ProjectConfig
from .errors import BuildError

VERSION = "1"


class QuantizationError(BuildError):
    """No int8 plan keeps the float32 labels well enough."""


# model_repository/multitask/1 in this source tree: model.py and the core package, the code Triton runs.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "multitask" / VERSION
ONNX_OPSET = 17
# Texts NNCF calibrates the int8 graph on (OpenVINO's default subset size).
CALIBRATION_TEXTS = 300


def render_model_config(config: ProjectConfig) -> dict:
    """config.pbtxt as a dict in model_config.proto's JSON form."""
    serving = config.serving
    outputs = [{"name": task.name, "data_type": "TYPE_FP32", "dims": [len(task.labels)]} for task in config.tasks]
    outputs.append({"name": TRUNCATED_NAME, "data_type": "TYPE_BOOL", "dims": [1]})
    parameters = {
        "tasks": json.dumps([{"name": t.name, "labels": list(t.labels)} for t in config.tasks], ensure_ascii=False),
        "max_tokens": str(config.backbone.max_tokens),
        "normalize": "true" if config.backbone.normalize else "false",
        "device": serving.device,
        "precision": serving.precision,
        "runtime": serving.runtime,
        "tokens_per_forward": str(serving.tokens_per_forward),
        "max_request_bytes": str(serving.max_request_bytes),
        "threads": str(serving.threads_per_instance),
        "output_filename": serving.output_filename,
        "truncated_output": TRUNCATED_NAME,
    }
    batching = {"max_queue_delay_microseconds": serving.max_queue_delay_microseconds}
    if serving.preferred_batch_sizes:
        batching["preferred_batch_size"] = serving.preferred_batch_sizes
    return {
        "name": serving.model_name,
        "backend": "python",
        "max_batch_size": serving.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [1]}],
        "output": outputs,
        "dynamic_batching": batching,
        # KIND_CPU even on a GPU host: the served model picks the device itself and moves tensors there.
        "instance_group": [{"kind": "KIND_CPU", "count": serving.instance_count}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def exports_openvino(config: ProjectConfig) -> bool:
    """The int8 graph is made for a CPU target (any device but gpu), whichever runtime the config names, so that
    one repository can be served by every runtime; runtime openvino needs it anyway."""
    return config.serving.runtime == "openvino" or config.serving.device != "gpu"


def serves_openvino(config: ProjectConfig) -> bool:
    """Whether the int8 graph is what the server will run (then it must pass the bar, or the build fails)."""
    return config.serving.runtime == "openvino" or (config.serving.runtime == "auto" and config.serving.device != "gpu")


def export_onnx(model: MultiTaskModel, path: Path, text: TextEncoder) -> None:
    """One graph: encoder, pooling, normalisation and every head; dynamic batch and sequence axes."""
    sample = text.encode(["An example sentence to trace.", "A second, longer example sentence for the export."])
    names = list(model.heads)
    graph = ExportedGraph(model.float().eval())
    with torch.inference_mode():
        torch.onnx.export(
            graph,
            (torch.from_numpy(sample.ids), torch.from_numpy(sample.mask)),
            str(path),
            input_names=["ids", "mask"],
            output_names=names,
            opset_version=ONNX_OPSET,
            dynamo=False,
            dynamic_axes={
                "ids": {0: "rows", 1: "width"},
                "mask": {0: "rows", 1: "width"},
                **{name: {0: "rows"} for name in names},
            },
        )


# NNCF plans, tried in order until one keeps the float32 labels (serving.min_label_agreement) on every task of
# validation and challenge, with the smallest float32 recheck margin that does it (evaluate.RECHECK_MARGINS).
# The FFN matmuls see GELU's long-tailed activations; on the shipped model every plan that quantizes all of them
# or keeps the attention matmuls in floating point instead lost more labels (docs/training.md).
QUANTIZATION_PLANS = (
    ("FFN output matmuls kept in floating point", (r".*/output/dense_1/.*",)),
    ("FFN matmuls kept in floating point", (r".*/output/dense_1/.*", r".*/layer\.\d+/dense/.*")),
)


def export_openvino_int8(
    onnx_path: Path, xml_path: Path, text: TextEncoder, calibration_texts: list[str], accept, log
) -> dict:
    """The ONNX graph converted to OpenVINO IR and quantized to int8 by NNCF, calibrated on training texts.

    `accept(model) -> (recheck margin or None, detail)` judges a quantized model; the first plan it accepts is
    saved, with its settings (files.INT8_SETTINGS_FILE). Returns those settings and the time it took; raises the
    last plan's refusal when none is accepted."""
    import contextlib
    import io
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    started = time.perf_counter()
    # Calibration batches of 8 texts: the activation ranges of padded batches, as served.
    texts = calibration_texts[:CALIBRATION_TEXTS]
    items = [text.encode(texts[i : i + 8]) for i in range(0, len(texts), 8)]
    dataset = nncf.Dataset(items, lambda batch: {"ids": batch.ids, "mask": batch.mask})
    detail = ""
    for name, ignored in QUANTIZATION_PLANS:
        scope = nncf.IgnoredScope(patterns=list(ignored)) if ignored else None
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            quantized = nncf.quantize(
                ov.convert_model(str(onnx_path)),
                dataset,
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(texts),
                ignored_scope=scope,
            )
        margin, detail = accept(quantized)
        log(f"openvino int8 ({name}): {detail}")
        if margin is not None:
            ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
            settings = {"plan": name, "recheck_margin": margin, "calibration_texts": len(texts)}
            (xml_path.parent / files.INT8_SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
            seconds = time.perf_counter() - started
            log(f"openvino int8 graph saved: {name}, recheck margin {margin:g}; {len(texts)} texts, {seconds:.1f}s")
            return settings | {"seconds": round(seconds, 1)}
    raise QuantizationError(f"no int8 plan kept the float32 labels: {detail}")


def write_torch_artifacts(config: ProjectConfig, model: MultiTaskModel, backbone_dir: Path, staging: Path) -> list[str]:
    """Weights, tokenizer, encoder config, config.pbtxt and the code into staging/: enough to open the model
    with the torch runtime. Returns the artifact names for the manifest."""
    staging.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        str(staging / files.WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    shutil.copyfile(backbone_dir / files.TOKENIZER_FILE, staging / files.TOKENIZER_FILE)
    shutil.copyfile(backbone_dir / "config.json", staging / files.ENCODER_CONFIG_FILE)
    shutil.copyfile(SOURCE_DIR / files.MODEL_FILE, staging / files.MODEL_FILE)
    shutil.copytree(
        SOURCE_DIR / files.CORE_PACKAGE,
        staging / files.CORE_PACKAGE,
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    pbtxt.write_config(render_model_config(config), staging / pbtxt.CONFIG_FILE)
    return [files.WEIGHTS_FILE, files.TOKENIZER_FILE, files.ENCODER_CONFIG_FILE]


def write_graphs(
    config: ProjectConfig, model: MultiTaskModel, staging: Path, calibration_texts: list[str], accept_int8, log
) -> dict:
    """The ONNX graph, and on a CPU target its OpenVINO int8 form (see export_openvino_int8).

    Returns {"artifacts": [...], "runtimes": [...], "openvino": what the quantization did, when it ran}."""
    text = TextEncoder(staging / files.TOKENIZER_FILE, config.backbone.max_tokens)
    export_onnx(model.float().eval(), staging / files.ONNX_FILE, text)
    report = {"artifacts": [files.ONNX_FILE], "runtimes": ["torch", "onnxruntime"]}
    if exports_openvino(config):
        try:
            report["openvino"] = export_openvino_int8(
                staging / files.ONNX_FILE, staging / files.OPENVINO_FILE, text, calibration_texts, accept_int8, log
            )
        except QuantizationError as exc:
            if serves_openvino(config):
                raise
            # Another runtime serves: the int8 graph is an extra, left out rather than shipped below the bar.
            log(f"openvino int8 graph left out ({config.serving.runtime} serves this model): {exc}")
            report["openvino"] = {"plan": None, "left_out": str(exc)}
            return report
        report["artifacts"] += [
            files.OPENVINO_FILE,
            str(Path(files.OPENVINO_FILE).with_suffix(".bin")),
            files.INT8_SETTINGS_FILE,
        ]
        report["runtimes"].append("openvino")
    return report


def write_manifest(staging: Path, artifacts: list[str], inputs: dict) -> None:
    """The SHA-256 of every artifact and every source file, and the build's inputs digest; written last."""
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # readable by the container user too
    files.write_manifest(staging, artifacts + files.source_files(staging), {"inputs": inputs})


def install_repository(staging: Path, output: Path, model_name: str) -> Path:
    """Move staged files into <output>/<model_name>/ by rename, manifest and config.pbtxt last.

    Only generated files are replaced, so building into the source tree keeps model.py and the core as they are.
    """
    version_dir = output / model_name / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    last = (files.MANIFEST_FILE, pbtxt.CONFIG_FILE)
    sources = (files.MODEL_FILE, files.CORE_PACKAGE)
    into_source_tree = version_dir.resolve() == SOURCE_DIR.resolve()
    for path in sorted(staging.iterdir(), key=lambda p: p.name in last):
        destination = version_dir.parent / path.name if path.name == pbtxt.CONFIG_FILE else version_dir / path.name
        if path.name in sources and into_source_tree:
            continue  # building into the source tree: model.py and the core there are the sources themselves
        if path.is_dir():
            shutil.rmtree(destination, ignore_errors=True)
        path.replace(destination)
    shutil.rmtree(staging, ignore_errors=True)
    return version_dir
