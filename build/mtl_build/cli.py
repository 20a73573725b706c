"""`mtl-build`: verify the backbone, train, export, evaluate; the repository appears only when all succeeded."""
from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path

import click

from .backbone import BackboneError, verify_backbone
from .config import ConfigError, load_config
from .data import DataError, read_labelled_csv
from .serving_core import core


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default="config.yaml", show_default=True,
              help="Project configuration: backbone, tasks and labels, training and serving settings.")
@click.option("--output", type=click.Path(path_type=Path), default="model_repository", show_default=True,
              help="Triton model repository to write; the model goes in <output>/<serving.model_name>/.")
@click.option("--mode", type=click.Choice(["heads_only", "joint"]), default=None,
              help="Override training.mode: heads_only (frozen encoder, fast) or joint (fine-tune everything).")
@click.option("--precision", type=click.Choice(["auto", "float32"]), default=None,
              help="Override serving.precision: auto (float16 on a GPU, bfloat16 on an AMX CPU) or float32.")
def main(config_path: Path, output: Path, mode: str | None, precision: str | None) -> None:
    """Build the multi-task model repository from CONFIG and its labelled data."""
    try:
        build(config_path, output, mode, precision)
    except (ConfigError, BackboneError, DataError, core.ArtifactError) as exc:
        click.echo(f"mtl-build: error: {exc}", err=True)
        sys.exit(2)


def build(config_path: Path, output: Path, mode: str | None = None, precision: str | None = None) -> Path:
    # Imported here so that `mtl-build --help` and config errors answer without loading torch.
    from .evaluate import (ServedModel, evaluate, format_precision, format_table, max_parity_gap, served_precision,
                           write_model_card)
    from .export import export_artifacts, install_repository
    from .train import train

    started = time.perf_counter()
    config = load_config(config_path)
    if mode:
        config = config.model_copy(update={"training": config.training.model_copy(update={"mode": mode})})
    if precision:
        config = config.model_copy(update={"serving": config.serving.model_copy(update={"precision": precision})})
    backbone_dir = verify_backbone(config.backbone)
    echo = lambda message: click.echo(message, err=True)  # noqa: E731 - progress goes to stderr
    echo(f"backbone verified (SHA-256): {backbone_dir}")
    tasks = config.tasks
    train_data = read_labelled_csv(config.resolve(config.data.train), tasks, config.data.text_column)
    validation = read_labelled_csv(config.resolve(config.data.validation), tasks, config.data.text_column)
    echo(f"data: {len(train_data.texts)} training rows, {len(validation.texts)} validation rows; "
         f"mode {config.training.mode}, seed {config.training.seed}")

    model = train(config, backbone_dir, train_data)
    train_seconds = time.perf_counter() - started

    # Export and evaluate in a staging folder, then move into place: no half-written repository.
    output.mkdir(parents=True, exist_ok=True)
    staging = output / f".{config.serving.model_name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    export_artifacts(config, model, backbone_dir, staging)
    served = ServedModel.load(staging, config)
    probabilities = served.probabilities(validation.texts)
    report = evaluate(config, probabilities, validation)
    parity = max_parity_gap(served, model, validation.texts[:64])
    precision = served_precision(staging, config, probabilities, validation.texts)
    card = {
        "model_name": config.serving.model_name,
        "max_tokens": config.backbone.max_tokens,
        "tasks": {t.name: list(t.labels) for t in tasks},
        "training": {
            "mode": config.training.mode,
            "seed": config.training.seed,
            "train_rows": len(train_data.texts),
            "train_file": str(config.data.train),
            "seconds": round(train_seconds, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        },
        "validation_file": str(config.data.validation),
        "validation": report,
        "parity_max_abs_diff": parity,
        "served_precision": precision,
    }
    write_model_card(staging, card)
    version_dir = install_repository(staging, output, config.serving.model_name)

    click.echo(format_table(report))
    click.echo(f"\nserved-vs-transformers max |Δprob| (float32): {parity:.2e}")
    click.echo(format_precision(precision))
    click.echo(f"wrote {version_dir} in {time.perf_counter() - started:.1f}s")
    return version_dir
