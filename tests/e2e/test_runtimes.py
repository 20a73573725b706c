"""The real server with each runtime, on the same exported model: torch float32, ONNX Runtime, OpenVINO int8."""

import shutil

import numpy as np
import pytest

from mtl_build import pbtxt
from mtl_client import MultiTaskClient

pytestmark = pytest.mark.e2e


def _with_runtime(built_repository, test_config, runtime, folder):
    """A copy of the session repository whose config.pbtxt names `runtime` (edited through the schema)."""
    name = test_config.serving.model_name
    shutil.copytree(built_repository / name, folder / name, symlinks=True)
    model_config = pbtxt.read_config(folder / name)
    model_config["parameters"]["runtime"] = {"string_value": runtime}
    pbtxt.write_config(model_config, folder / name / "config.pbtxt")
    return folder


@pytest.fixture(scope="module")
def validation_texts(test_config_path):
    import csv

    with (test_config_path.parent / "validation.csv").open(newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def _scores(url, model, texts):
    with MultiTaskClient(url, model) as client:
        predictions = client.predict(texts)
    names = list(predictions[0].tasks)
    return {n: np.array([list(p.tasks[n].probabilities.values()) for p in predictions]) for n in names}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_each_runtime_serves_the_float32_labels(
    built_repository, test_config, triton_server, local_triton, tmp_path, validation_texts, runtime
):
    model = test_config.serving.model_name
    server = local_triton(repository=_with_runtime(built_repository, test_config, runtime, tmp_path))
    log = server.log_text()
    assert f"multitask ready: {runtime}" in log, log[-2000:]  # the choice is logged at load
    reference = _scores(triton_server.grpc_url, model, validation_texts)  # the session server: torch float32
    served = _scores(server.grpc_url, model, validation_texts)
    for task in reference:
        agreement = (served[task].argmax(1) == reference[task].argmax(1)).mean()
        if runtime == "onnxruntime":  # the same float32 computation in another engine
            assert np.abs(served[task] - reference[task]).max() < 1e-4, task
        else:  # int8: the labels, not the digits
            assert agreement >= test_config.serving.min_label_agreement, (task, agreement)
