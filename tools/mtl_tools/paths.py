"""Where the checkout keeps what the tools read and write; the tools run from a checkout (editable install)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
MODEL_REPOSITORY = ROOT / "model_repository"
# The served model's sources, as Triton loads them (model.py and the multitask_core package).
SOURCE_VERSION = MODEL_REPOSITORY / "multitask" / "1"
