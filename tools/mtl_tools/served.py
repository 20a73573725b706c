"""The served model, opened as Triton's model.py opens it: config.pbtxt through the schema, then ServedModel."""

from __future__ import annotations

from pathlib import Path

MODEL = "multitask"


def version_dir(repository: Path, model: str = MODEL) -> Path:
    return Path(repository) / model / "1"


def open_served(folder: Path, **overrides):
    """`overrides` (runtime, device, precision, threads, token_cap) replace what the config says."""
    from mtl_build import pbtxt
    from multitask_core.served import ServedModel

    return ServedModel.open(folder, pbtxt.version_folder_config(folder), **overrides)
