"""Clients nobody here wrote (plain HTTP/JSON, tritonclient gRPC) against the real server."""

import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

pytestmark = pytest.mark.e2e
LABELS = {"topic": ["entertainment", "finance", "tech"], "sentiment": ["negative", "neutral", "positive"]}
# Clear-cut sentences with their expected (topic, sentiment).
CLEAR = [
    ("I love my bank, their savings account earned me a great return this year, so happy", "finance", "positive"),
    ("This phone update drains my battery in two hours, absolutely useless", "tech", "negative"),
    ("The band's new album is a joyful, beautifully produced masterpiece", "entertainment", "positive"),
]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _kserve_body(texts):
    return {"inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}


def test_plain_http_json_gets_correct_labels(triton_server):
    status, body = _post(f"{triton_server.http_url}/v2/models/multitask/infer", _kserve_body([t for t, _, _ in CLEAR]))
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"topic", "sentiment", "TRUNCATED"}
    for task, column in (("topic", 1), ("sentiment", 2)):
        assert outputs[task]["shape"] == [3, 3]
        probs = np.array(outputs[task]["data"]).reshape(3, 3)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert [LABELS[task][i] for i in probs.argmax(axis=1)] == [row[column] for row in CLEAR]
    assert outputs["TRUNCATED"]["data"] == [False, False, False]


def test_tritonclient_grpc_reads_labels_from_model_config(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        config = client.get_model_config("multitask", as_json=True)["config"]
        tasks = json.loads(config["parameters"]["tasks"]["string_value"])
        assert {t["name"]: t["labels"] for t in tasks} == LABELS
        tensor = grpcclient.InferInput("TEXT", [len(CLEAR), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t, _, _ in CLEAR], dtype=object))
        result = client.infer("multitask", [tensor])
        for task in tasks:
            predicted = [task["labels"][i] for i in result.as_numpy(task["name"]).argmax(axis=1)]
            column = 1 if task["name"] == "topic" else 2
            assert predicted == [row[column] for row in CLEAR]


def test_bad_request_gets_invalid_arg_and_the_model_keeps_serving(triton_server):
    url = f"{triton_server.http_url}/v2/models/multitask/infer"
    status, body = _post(url, _kserve_body(["fine text", "   "]))
    assert status == 400 and body["error"].startswith("row 1: empty text"), body
    status, body = _post(url, _kserve_body(["The stock market rallied"]))
    assert status == 200 and body["outputs"][0]["shape"] == [1, 3]


def test_long_text_is_truncated_and_reported(triton_server):
    status, body = _post(
        f"{triton_server.http_url}/v2/models/multitask/infer", _kserve_body(["short", "the market " * 400])
    )
    assert status == 200
    truncated = next(o for o in body["outputs"] if o["name"] == "TRUNCATED")
    assert truncated["data"] == [False, True]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_health_endpoints(triton_server):
    assert _get(f"{triton_server.http_url}/v2/health/live") == 200
    assert _get(f"{triton_server.http_url}/v2/health/ready") == 200
    assert _get(f"{triton_server.http_url}/v2/models/multitask/ready") == 200
    assert _get(f"{triton_server.http_url}/v2/models/no_such_model/ready") != 200


def _success_count(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'^nv_inference_request_success\{[^}]*model="multitask"[^}]*\} (\S+)$', text, re.M)
    assert match, "nv_inference_request_success for multitask missing from /metrics"
    return float(match.group(1))


def test_metrics_count_every_successful_request(triton_server):
    import time

    started = time.monotonic()
    before = _success_count(triton_server.metrics_url)
    sent = 5
    for i in range(sent):
        status, _ = _post(f"{triton_server.http_url}/v2/models/multitask/infer", _kserve_body([f"request number {i}"]))
        assert status == 200
    # Triton refreshes the counters on its metrics interval (2 s by default).
    deadline = time.monotonic() + 10
    while _success_count(triton_server.metrics_url) < before + sent and time.monotonic() < deadline:
        time.sleep(0.5)
    counted = _success_count(triton_server.metrics_url) - before
    # Triton also counts the watchdog's canary, one inference every probe interval.
    canaries = (time.monotonic() - started) / triton_server.probe_interval_s + 1
    assert sent <= counted <= sent + canaries, (counted, sent, canaries)
