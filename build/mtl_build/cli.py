"""`mtl-build`: verify the backbone, train, calibrate, export, check every graph, evaluate; then install.

The repository appears only when every step succeeded. Everything before training (config, backbone, data,
the cache check) runs without importing torch, so a mistake is reported at once.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import click

from .backbone import verify_backbone
from .config import ProjectConfig, load_config
from .data import LabelledData, read_labelled_csv
from .errors import BuildError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default="config.yaml",
    show_default=True,
    help="Project configuration: backbone, tasks and labels, training and serving settings.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default="model_repository",
    show_default=True,
    help="Triton model repository to write; the model goes in <output>/<serving.model_name>/.",
)
@click.option(
    "--mode",
    type=click.Choice(["heads_only", "joint"]),
    default=None,
    help="Override training.mode: heads_only (frozen encoder, fast) or joint (fine-tune everything).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32"]),
    default=None,
    help="Override serving.precision: auto (float16 on a GPU, bfloat16 on a fast-bfloat16 CPU) or float32.",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "torch", "openvino", "onnxruntime"]),
    default=None,
    help="Override serving.runtime: auto (OpenVINO int8 on a CPU, torch on a GPU), torch, openvino, onnxruntime.",
)
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged since the last build.")
def main(
    config_path: Path, output: Path, mode: str | None, precision: str | None, runtime: str | None, force: bool
) -> None:
    """Build the multi-task model repository from CONFIG and its labelled data.

    A build whose inputs (config, data, backbone, code, library versions) are unchanged is skipped.
    Exit codes: 0 built or unchanged, 2 a problem with the inputs (config, backbone, data, a failed graph check).
    """
    try:
        build(config_path, output, mode, precision, runtime, force=force)
    except BuildError as exc:
        click.echo(f"mtl-build: error: {exc}", err=True)
        sys.exit(2)


def _echo(message: str) -> None:
    click.echo(message, err=True)  # progress goes to stderr, results to stdout


def overridden(config: ProjectConfig, mode: str | None, precision: str | None, runtime: str | None) -> ProjectConfig:
    if mode:
        config = config.model_copy(update={"training": config.training.model_copy(update={"mode": mode})})
    serving = {k: v for k, v in (("precision", precision), ("runtime", runtime)) if v}
    if serving:
        config = config.model_copy(update={"serving": config.serving.model_copy(update=serving)})
    return config


def read_data(config: ProjectConfig) -> tuple[LabelledData, LabelledData, LabelledData | None]:
    def read(path: Path) -> LabelledData:
        return read_labelled_csv(
            config.resolve(path), config.tasks, config.data.text_column, config.data.register_column
        )

    challenge = read(config.data.challenge) if config.data.challenge is not None else None
    return read(config.data.train), read(config.data.validation), challenge


def build(
    config_path: Path,
    output: Path,
    mode: str | None = None,
    precision: str | None = None,
    runtime: str | None = None,
    *,
    force: bool = False,
    log=_echo,
) -> Path:
    started = time.perf_counter()
    log = _stamped(log, started)
    config = overridden(load_config(config_path), mode, precision, runtime)
    backbone_dir = verify_backbone(config.backbone)
    log(f"backbone verified (SHA-256): {backbone_dir}")
    train_data, validation, challenge = read_data(config)
    log(
        f"data: {len(train_data.texts):,} training, {len(validation.texts):,} validation"
        + (f", {len(challenge.texts):,} challenge rows" if challenge else "")
        + f"; mode {config.training.mode}, seed {config.training.seed}"
    )

    from . import cache
    from .export import SOURCE_DIR, VERSION

    version_dir = output / config.serving.model_name / VERSION
    inputs = cache.build_inputs(config, SOURCE_DIR)
    if not force and cache.unchanged(version_dir, inputs):
        log(
            f"{version_dir}: inputs unchanged since its build (digest {inputs['digest'][:12]}); "
            "skipping the build (--force rebuilds)"
        )
        return version_dir
    if version_dir.exists() and not force:
        log(f"rebuilding: changed since the last build: {', '.join(cache.changed_parts(version_dir, inputs))}")

    # Imported here so that `mtl-build --help`, config errors and an unchanged build answer without torch.
    from .pipeline import run_pipeline

    return run_pipeline(config, backbone_dir, train_data, validation, challenge, output, inputs, started, log)


def _stamped(log, started: float):
    """Each progress line with the seconds since the build started: where a slow build spends its time."""

    def stamped(message: str) -> None:
        log(f"[{time.perf_counter() - started:4.0f}s] {message}")

    return stamped


def machine() -> str:
    """The CPU by name, generation and the features that decide bfloat16/int8 speed: one description, the tools'."""
    from mtl_tools.machine import describe_cpu

    return describe_cpu()["summary"]


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
