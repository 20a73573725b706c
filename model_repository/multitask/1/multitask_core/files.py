"""The files of a model-repository version folder, and the check that they are the ones the build wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Written by mtl-build beside model.py.
WEIGHTS_FILE = "weights.safetensors"  # torch runtime
TOKENIZER_FILE = "tokenizer.json"
ENCODER_CONFIG_FILE = "encoder_config.json"
ONNX_FILE = "model.onnx"  # onnxruntime runtime: float32, padded [rows, width] inputs
OPENVINO_FILE = "model_int8.xml"  # openvino runtime: the ONNX graph quantized to int8 (weights in .bin beside it)
INT8_SETTINGS_FILE = "model_int8.json"  # how the int8 graph was made, and the margin of its float32 recheck
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
# Source files Triton runs: model.py and this package; the manifest covers them too.
MODEL_FILE = "model.py"
CORE_PACKAGE = "multitask_core"


def read_int8_settings(folder: Path) -> dict:
    """The int8 graph's settings ({"plan", "recheck_margin", ...}); {} for a graph built without them."""
    path = folder / INT8_SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class ArtifactError(RuntimeError):
    """The exported model files are missing or do not match the build's manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(folder: Path) -> list[str]:
    """model.py and the core package's modules, relative to the version folder, sorted."""
    package = sorted(str(p.relative_to(folder)) for p in (folder / CORE_PACKAGE).glob("*.py"))
    return [MODEL_FILE, *package]


def write_manifest(folder: Path, names: list[str], extra: dict | None = None) -> dict:
    """manifest.json: the SHA-256 of each file, plus `extra` (the build's inputs digest)."""
    manifest = {"sha256": {name: sha256_file(folder / name) for name in sorted(names)}, **(extra or {})}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def verify_artifacts(folder: Path) -> dict:
    """Check every file the build recorded, code included, against its SHA-256; return the manifest."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: run mtl-build to export the model")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: run mtl-build again")
        digest = sha256_file(path)
        if digest != expected:
            raise ArtifactError(
                f"{path} has SHA-256 {digest}, the build recorded {expected}: the file is corrupt or was replaced"
            )
    return manifest
