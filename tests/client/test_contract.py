"""Reading the model's contract from its config, and turning responses into typed predictions."""

import copy
import json

import numpy as np
import pytest

from mtl_client import ModelContract, ModelContractError, Prediction, TaskPrediction

TASKS = [
    {"name": "topic", "labels": ["entertainment", "finance", "tech"]},
    {"name": "sentiment", "labels": ["negative", "neutral", "positive"]},
]


def _response(tasks=TASKS, **changes):
    """The shape tritonclient's get_model_config(as_json=True) returns (int64 values as strings)."""
    config = {
        "name": "multitask",
        "max_batch_size": 256,
        "input": [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"]}],
        "output": [{"name": t["name"], "data_type": "TYPE_FP32", "dims": [str(len(t["labels"]))]} for t in tasks]
        + [{"name": "TRUNCATED", "data_type": "TYPE_BOOL", "dims": ["1"]}],
        "parameters": {
            "tasks": {"string_value": json.dumps(tasks)},
            "max_tokens": {"string_value": "256"},
            "output_filename": {"string_value": "{task}_predictions.csv"},
            "truncated_output": {"string_value": "TRUNCATED"},
        },
        "backend": "python",
    }
    config.update(changes)
    return {"config": config}


def test_contract_from_the_servers_config():
    contract = ModelContract.from_model_config(_response(), "multitask")
    assert contract.input_name == "TEXT" and contract.max_batch_size == 256 and contract.max_tokens == 256
    assert contract.task_names == ["topic", "sentiment"]
    assert contract.task("sentiment").labels == ("negative", "neutral", "positive")
    assert contract.truncated_output == "TRUNCATED"
    assert contract.output_files() == {"topic": "topic_predictions.csv", "sentiment": "sentiment_predictions.csv"}
    assert contract.output_files("jsonl")["topic"] == "topic_predictions.jsonl"
    # The inner "config" alone is accepted too.
    assert ModelContract.from_model_config(_response()["config"]) == contract


def test_a_new_task_needs_no_code():
    tasks = TASKS + [{"name": "urgency", "labels": ["low", "high"]}]
    contract = ModelContract.from_model_config(_response(tasks))
    assert contract.task_names == ["topic", "sentiment", "urgency"]


def _parameters(**values):
    response = _response()
    params = response["config"]["parameters"]
    for key, value in values.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = {"string_value": value}
    return response


@pytest.mark.parametrize(
    "response, message",
    [
        (_parameters(tasks=None), "no 'tasks' parameter"),
        (_parameters(tasks="[{not json"), "'tasks' is not valid JSON"),
        (_parameters(tasks="{}"), "non-empty JSON list"),
        (_parameters(tasks='[{"labels": ["a"]}]'), r"tasks\[0\] has no string 'name'"),
        (_parameters(tasks='[{"name": "topic", "labels": []}]'), "task 'topic' needs a non-empty list"),
        (_parameters(tasks='[{"name": "topic", "labels": ["a", "a"]}]'), "repeats a label"),
        (
            _parameters(tasks=json.dumps(TASKS + [{"name": "urgency", "labels": ["low", "high"]}])),
            "task 'urgency' .2 labels. needs an output tensor named 'urgency'; "
            "the outputs are topic, sentiment, TRUNCATED",
        ),
        (
            _parameters(tasks=json.dumps([{"name": "topic", "labels": ["a", "b"]}])),
            r"output 'topic' is TYPE_FP32 dims \[3\]; task 'topic' \(2 labels\) needs TYPE_FP32 dims \[2\]",
        ),
        (_parameters(truncated_output="CUT"), "needs an output tensor named 'CUT'"),
        (_parameters(output_filename="predictions.csv"), "must contain '{task}'"),
        (_parameters(output_filename="../{task}.csv"), "not a plain file name"),
        (_response(max_batch_size=0), "max_batch_size is 0"),
        (
            _response(input=[{"name": "IDS", "data_type": "TYPE_INT64", "dims": ["-1"]}]),
            r"one TYPE_STRING input, found IDS",
        ),
    ],
)
def test_contract_errors_say_what_is_wrong(response, message):
    with pytest.raises(ModelContractError, match=message):
        ModelContract.from_model_config(response, "multitask")


def test_wrong_output_type_is_refused():
    response = _response()
    response["config"]["output"][0]["data_type"] = "TYPE_FP16"
    with pytest.raises(ModelContractError, match="output 'topic' is TYPE_FP16"):
        ModelContract.from_model_config(response)


def test_decode_builds_typed_predictions_in_row_order():
    contract = ModelContract.from_model_config(_response())
    outputs = {
        "topic": np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]], dtype=np.float32),
        "sentiment": np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=np.float32),
        "TRUNCATED": np.array([[False], [True]]),
    }
    first, second = contract.decode(outputs.get, ["stocks rally", "a long film"])
    assert isinstance(first, Prediction) and isinstance(first["topic"], TaskPrediction)
    assert first.text == "stocks rally" and first["topic"].label == "finance"
    assert first["topic"].score == pytest.approx(0.7)
    assert first.tasks["sentiment"].probabilities == pytest.approx({"negative": 0.2, "neutral": 0.3, "positive": 0.5})
    assert list(first["sentiment"].probabilities) == ["negative", "neutral", "positive"]
    assert second.labels == {"topic": "entertainment", "sentiment": "negative"}
    assert (first.truncated, second.truncated) == (False, True)
    assert list(first) == ["topic", "sentiment"] and len(first) == 2
    assert first.to_dict()["tasks"]["topic"]["label"] == "finance"
    with pytest.raises(KeyError, match="the model's tasks are topic, sentiment"):
        first["urgency"]


def test_decode_checks_the_response_shape():
    contract = ModelContract.from_model_config(_response())
    outputs = {"topic": np.zeros((2, 3), np.float32), "TRUNCATED": np.zeros((2, 1), bool)}
    with pytest.raises(ModelContractError, match="no output 'sentiment'"):
        contract.decode(outputs.get, ["a", "b"])
    outputs["sentiment"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ModelContractError, match=r"output 'sentiment' has shape \[2, 2\]; expected \[2, 3\]"):
        contract.decode(outputs.get, ["a", "b"])


def test_request_tensor_is_n_by_1_bytes():
    contract = ModelContract.from_model_config(_response())
    inputs, outputs = contract.request([b"a", "é".encode()])
    tensor = inputs[0]._get_tensor()
    assert tensor.name == "TEXT" and list(tensor.shape) == [2, 1] and tensor.datatype == "BYTES"
    assert [o._get_tensor().name for o in outputs] == ["topic", "sentiment", "TRUNCATED"]
    assert copy.deepcopy(contract) == contract
