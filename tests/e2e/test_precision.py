"""serving.precision auto through the real server: the reduced type model.py picks gives float32's labels."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_build.config import load_config
from mtl_build.export import render_config_pbtxt
from mtl_build.serving_core import core
from mtl_client import MultiTaskClient
from mtl_serve import LocalTriton

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
# The GPU target for float16, applied to bfloat16 on a CPU as well.
MIN_LABEL_AGREEMENT = 0.995


def _validation_texts() -> list[str]:
    with open(ROOT / "data" / "validation.csv", newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def _labels(url: str, texts: list[str]) -> dict[str, np.ndarray]:
    with MultiTaskClient(url) as client:
        predictions = client.predict(texts)
        tasks = [task.name for task in client.get_contract().tasks]
    return {task: np.array([p[task].label for p in predictions]) for task in tasks}


def test_auto_precision_serves_the_float32_labels(built_repository, triton_server, tmp_path):
    config = load_config(ROOT / "config.yaml")
    auto = config.model_copy(update={"serving": config.serving.model_copy(update={"precision": "auto"})})
    repository = tmp_path / "repository"
    shutil.copytree(built_repository, repository, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    (repository / config.serving.model_name / "config.pbtxt").write_text(render_config_pbtxt(auto), encoding="utf-8")
    texts = _validation_texts()

    with LocalTriton(repository, grpc_port=0, http_port=0, metrics_port=0, log_file=tmp_path / "triton.log") as server:
        reduced = _labels(server.grpc_url, texts)
        log = server.log_text()
    reference = _labels(triton_server.grpc_url, texts)

    expected = str(core.pick_dtype(torch.device("cpu"), "auto"))  # bfloat16 on an AMX CPU, else float32
    assert f"dtype={expected}" in log
    assert f"dtype={torch.float32}" in triton_server.log_text()
    for task, labels in reference.items():
        agreement = float((reduced[task] == labels).mean())
        print(f"{task}: {expected} labels equal float32 on {agreement:.2%} of {len(texts)} rows")
        assert agreement >= MIN_LABEL_AGREEMENT, task
