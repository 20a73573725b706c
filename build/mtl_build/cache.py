"""What a build is made from, hashed: an unchanged build is skipped, and the check is a digest, not a guess.

The digest covers the resolved configuration, the data files, the backbone's pinned hashes, the code of the
build and of the served core, and the versions of the libraries that shape the artifacts. It is stored in
manifest.json; `mtl-build --force` rebuilds anyway.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from multitask_core import files

from .config import ProjectConfig

LIBRARIES = (
    "torch",
    "numpy",
    "tokenizers",
    "safetensors",
    "emoji",
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "scikit-learn",
    "transformers",
)
BUILD_DIR = Path(__file__).resolve().parent
CLIENT_METRICS = BUILD_DIR.parents[1] / "client" / "mtl_client" / "metrics.py"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _code_files(source_dir: Path) -> list[Path]:
    core = sorted((source_dir / files.CORE_PACKAGE).glob("*.py"))
    return [*sorted(BUILD_DIR.glob("*.py")), source_dir / files.MODEL_FILE, *core, CLIENT_METRICS]


def build_inputs(config: ProjectConfig, source_dir: Path) -> dict:
    data = {
        str(path): files.sha256_file(config.resolve(path))
        for path in (config.data.train, config.data.validation, config.data.challenge)
        if path is not None
    }
    code = {
        path.name if path.parent == BUILD_DIR else str(path.relative_to(source_dir.parents[2])): files.sha256_file(path)
        for path in _code_files(source_dir)
        if path.is_file()
    }
    parts = {
        "config": json.loads(config.model_dump_json(exclude={"root"})),
        "data": data,
        "code": code,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "python": platform.python_version(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "parts": parts}


def unchanged(version_dir: Path, inputs: dict) -> bool:
    """True when version_dir holds a complete build of exactly these inputs (every file still verified)."""
    manifest = version_dir / files.MANIFEST_FILE
    if not manifest.is_file() or not (version_dir.parent / "config.pbtxt").is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text()).get("inputs", {}).get("digest")
        files.verify_artifacts(version_dir)
    except (ValueError, files.ArtifactError, OSError):
        return False
    return recorded == inputs["digest"]


def changed_parts(version_dir: Path, inputs: dict) -> list[str]:
    """Which parts of the inputs differ from the recorded build (for the log line)."""
    try:
        recorded = json.loads((version_dir / files.MANIFEST_FILE).read_text()).get("inputs", {}).get("parts", {})
    except (OSError, ValueError):
        return ["no earlier build"]
    return [name for name, value in inputs["parts"].items() if recorded.get(name) != value] or ["files"]
