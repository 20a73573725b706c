"""serving.precision auto through the real server: the reduced type the torch runtime picks gives float32's labels."""

import csv
import shutil

import numpy as np
import pytest
import torch

from mtl_build import pbtxt
from mtl_client import MultiTaskClient
from multitask_core.spec import pick_dtype

pytestmark = pytest.mark.e2e


def _labels(url: str, model: str, texts: list[str]) -> dict[str, np.ndarray]:
    with MultiTaskClient(url, model) as client:
        predictions = client.predict(texts)
    return {task: np.array([p[task].label for p in predictions]) for task in predictions[0].tasks}


def test_auto_precision_serves_the_float32_labels(built_repository, test_config, triton_server, local_triton, tmp_path):
    name = test_config.serving.model_name
    shutil.copytree(built_repository / name, tmp_path / name, symlinks=True)
    model_config = pbtxt.read_config(tmp_path / name)  # the test project serves torch float32; here: auto
    model_config["parameters"]["precision"] = {"string_value": "auto"}
    pbtxt.write_config(model_config, tmp_path / name / pbtxt.CONFIG_FILE)
    with (test_config.resolve(test_config.data.validation)).open(newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]

    server = local_triton(repository=tmp_path)
    expected = str(pick_dtype(torch.device("cpu"), "auto")).removeprefix("torch.")  # bfloat16 with AVX512-BF16
    assert f"multitask ready: torch {expected} on cpu" in server.log_text()
    assert "multitask ready: torch float32 on cpu" in triton_server.log_text()
    reduced = _labels(server.grpc_url, name, texts)
    reference = _labels(triton_server.grpc_url, name, texts)
    for task, labels in reference.items():
        agreement = float((reduced[task] == labels).mean())
        print(f"{task}: {expected} labels equal float32 on {agreement:.2%} of {len(texts)} rows")
        assert agreement >= test_config.serving.min_label_agreement, task
