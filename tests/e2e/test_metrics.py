"""model.py's mtl_* metrics: the counting core without Triton, then the real server's metrics endpoint.

The counting tests compare multitask_core.metrics with a row-by-row count written here. The server tests send
known requests and check that every mtl_* series moved by exactly what the client received.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from multitask_core import metrics as serving_metrics
from multitask_core.text import RowError, decode_texts

SENTENCES = [
    "The central bank raised interest rates again to fight inflation",
    "This new phone's battery dies before lunch, what a waste of money",
    "The film's soundtrack is gorgeous and the cast is wonderful",
    "Shares of the chipmaker fell sharply after weak quarterly results",
    "The update finally fixed the crash in the photo app",
    "Tickets for the band's reunion tour sold out in minutes",
    "Is the meeting about the merger still on for Tuesday?",
    "My laptop keeps overheating whenever I open a browser",
    "What a brilliant season finale, I cried at the end",
    "The startup raised forty million dollars in its latest round",
    "The museum reopens on Monday with a new photography exhibition",
    "The cloud outage took down thousands of websites for hours",
]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# -- helpers -----------------------------------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"unparsable metrics line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def value(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(condition, timeout_s: float = 30.0, interval_s: float = 0.25):
    """Poll until `condition()` returns something truthy (the flusher publishes every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval_s)


def settled(url: str, before: dict, requests: int, rejected: dict) -> dict | None:
    """The scrape once every request is counted and a further flush interval changed no mtl_* series
    (a scrape can land in the middle of a flush, which sends one series at a time)."""
    first = scrape(url)
    if delta(first, before, "mtl_request_rows_count") < requests or not all(
        delta(first, before, "mtl_rejected_requests_total", reason=r) >= 1 for r in rejected
    ):
        return None
    time.sleep(1.5 * serving_metrics.FLUSH_INTERVAL_S)
    second = scrape(url)
    mtl_only = lambda samples: {key: v for key, v in samples.items() if key[0].startswith("mtl_")}  # noqa: E731
    return second if mtl_only(first) == mtl_only(second) else None


def tasks_of(config) -> list[tuple[str, list[str]]]:
    return [(task.name, list(task.labels)) for task in config.tasks]


def infer(client, model: str, rows: list[bytes], request_id: str = ""):
    tensor = grpcclient.InferInput("TEXT", [len(rows), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(rows, dtype=object).reshape(-1, 1))
    return client.infer(model, [tensor], request_id=request_id)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.load(response)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


# -- the counting core, without Triton ---------------------------------------------------------------------
def test_one_execute_is_counted_as_a_row_by_row_count_would(test_config):
    tasks = tasks_of(test_config)
    tally = serving_metrics.ServingMetrics(tasks, 256, {"model": "m", "version": "1"})
    rng = np.random.default_rng(7)
    sizes = [1, 3, 64, 200]
    rows = sum(sizes)
    probabilities = {name: softmax(rng.normal(scale=3.0, size=(rows, len(labels)))) for name, labels in tasks}
    truncated = rng.random(rows) < 0.1
    tally.record_batch(probabilities, truncated, sizes)
    got = {(s.family.name, s.labels): v for s, v in tally.drain()}

    def expect(family, count, **labels):
        key = (family.name, tuple(sorted({"model": "m", "version": "1", **labels}.items())))
        assert got.get(key, 0.0) == pytest.approx(count, rel=1e-12), key

    for name, labels in tasks:
        rows_of_task = probabilities[name].tolist()
        for index, label in enumerate(labels):
            chosen = sum(1 for r in rows_of_task if r.index(max(r)) == index)
            expect(serving_metrics.PREDICTIONS, chosen, task=name, label=label)
        tops = [max(r) for r in rows_of_task]
        for bound in (*serving_metrics.TOP_PROBABILITY_BUCKETS, math.inf):
            expect(
                serving_metrics.TOP_PROBABILITY_BUCKET,
                sum(1 for t in tops if t <= bound),
                task=name,
                le=serving_metrics.le_label(bound),
            )
        expect(serving_metrics.TOP_PROBABILITY_SUM, sum(tops), task=name)
        expect(serving_metrics.TOP_PROBABILITY_COUNT, rows, task=name)
    expect(serving_metrics.TRUNCATED_ROWS, int(truncated.sum()))
    for bound in (1, 2, 4, 8, 16, 32, 64, 128, 256, math.inf):
        expect(
            serving_metrics.REQUEST_ROWS_BUCKET, sum(1 for s in sizes if s <= bound), le=serving_metrics.le_label(bound)
        )
    expect(serving_metrics.REQUEST_ROWS_SUM, rows)
    expect(serving_metrics.REQUEST_ROWS_COUNT, len(sizes))
    assert tally.drain() == []  # drained means reset


def test_requests_flagged_as_not_counted_leave_no_trace(test_config):
    tasks = tasks_of(test_config)
    rng = np.random.default_rng(3)
    sizes, counted = [2, 5, 3], [True, False, True]
    probabilities = {name: softmax(rng.normal(size=(sum(sizes), len(labels)))) for name, labels in tasks}
    truncated = np.array([False, True] + [True] * 5 + [False, False, True])
    mixed = serving_metrics.ServingMetrics(tasks, 16, {})
    mixed.record_batch(probabilities, truncated, sizes, counted)
    alone = serving_metrics.ServingMetrics(tasks, 16, {})
    keep = np.r_[0:2, 7:10]
    alone.record_batch({name: probs[keep] for name, probs in probabilities.items()}, truncated[keep], [2, 3])
    assert mixed.drain() == alone.drain()
    mixed.record_batch(probabilities, truncated, sizes, [False, False, False])
    assert mixed.drain() == []


def test_only_positive_finite_increments_leave_the_tally(test_config):
    """Triton 2.51 aborts on a negative counter increment, and a NaN would poison a sum for good."""
    name, labels = tasks_of(test_config)[0]
    tally = serving_metrics.ServingMetrics([(name, labels)], 8, {})
    broken = np.full((2, len(labels)), np.nan, dtype=np.float32)
    broken[1] = softmax(np.arange(len(labels), dtype=np.float64)[None, :])[0]
    tally.record_batch({name: broken}, np.zeros(2, bool), [2])
    deltas = tally.drain()
    assert deltas and all(math.isfinite(v) and v > 0 for _, v in deltas)
    by_key = {(s.family.name, s.label_dict.get("le")): v for s, v in deltas}
    assert by_key[("mtl_top_probability_bucket", "0.4")] == 1  # the NaN row: no confidence at all
    assert by_key[("mtl_top_probability_sum", None)] == pytest.approx(float(broken[1].max()))
    assert ("mtl_truncated_rows_total", None) not in by_key  # zero changes are not sent


def test_rejection_reasons_of_the_served_decoder():
    reasons = []
    for raw in ([b"fine", b"\xff\xfe"], [" \t\u200b ".encode()], [b" "]):
        with pytest.raises(RowError) as caught:
            decode_texts(np.array(raw, dtype=object).reshape(-1, 1))
        reasons.append(serving_metrics.rejection_reason(caught.value))
    assert reasons == ["invalid_utf8", "empty_text", "empty_text"]
    with pytest.raises(ValueError) as caught:
        decode_texts(np.zeros((0, 1), dtype=object))
    assert serving_metrics.rejection_reason(caught.value) == "other"
    tally = serving_metrics.ServingMetrics([("t", ["a", "b"])], 4, {})
    for reason in ("empty_text", "invalid_utf8", "no such reason"):
        tally.record_rejection(reason)
    got = {s.label_dict["reason"]: v for s, v in tally.drain()}
    assert got == {"empty_text": 1, "invalid_utf8": 1, "other": 1}


def test_request_row_buckets_are_powers_of_two_up_to_max_batch_size():
    assert serving_metrics.request_rows_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert serving_metrics.request_rows_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert serving_metrics.request_rows_buckets(1) == (1,)
    assert serving_metrics.le_label(math.inf) == "+Inf" and serving_metrics.le_label(0.95) == "0.95"


def test_expected_gauges_come_from_metrics_json(version_dir, test_config):
    tasks = tasks_of(test_config)
    recorded = json.loads((version_dir / "metrics.json").read_text())
    gauges, missing = serving_metrics.expected_gauges_in(version_dir, tasks, {"model": "m"})
    assert missing == []
    shares = {
        (s.label_dict["task"], s.label_dict["label"]): v
        for s, v in gauges
        if s.family is serving_metrics.EXPECTED_LABEL_SHARE
    }
    assert shares == {
        (name, label): recorded["expected_label_share"][name][label] for name, labels in tasks for label in labels
    }
    medians = {
        s.label_dict["task"]: v for s, v in gauges if s.family is serving_metrics.EXPECTED_TOP_PROBABILITY_MEDIAN
    }
    assert set(medians) == {name for name, _ in tasks} and all(0 < m <= 1 for m in medians.values())
    # Interpolated inside the median's bin, as histogram_quantile does: half of 4 rows in [0.5, 1) -> 0.75.
    bins = [{"low": 0.0, "high": 0.5, "rows": 0}, {"low": 0.5, "high": 1.0, "rows": 4}]
    assert serving_metrics.median_from_bins(bins) == 0.75
    assert serving_metrics.median_from_bins([{"low": 0.0, "high": 0.5, "rows": 0}]) is None
    gauges, missing = serving_metrics.expected_gauges({}, tasks, {})
    assert gauges == [] and len(missing) == 2 * len(tasks)
    gauges, missing = serving_metrics.expected_gauges_in(version_dir / "nowhere", tasks, {})
    assert gauges == [] and missing and "metrics.json" in missing[0]


def test_flusher_sends_each_change_once_and_the_rest_at_stop():
    tally = serving_metrics.ServingMetrics([("t", ["a", "b"])], 4, {})
    sent = []
    flusher = serving_metrics.Flusher(
        tally, lambda series, d: sent.append((series.family.name, series.label_dict, d)), interval_s=3600
    )
    flusher.start()
    tally.record_batch({"t": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}, np.array([True, False]), [2])
    assert flusher.flush() == len(sent) > 0
    assert ("mtl_truncated_rows_total", {}, 1.0) in sent
    assert flusher.flush() == 0  # nothing new, nothing sent
    sent.clear()
    tally.record_rejection("empty_text")
    flusher.stop()  # the last counts go out at stop, without waiting for the interval
    assert sent == [("mtl_rejected_requests_total", {"reason": "empty_text"}, 1.0)]
    assert "2 flushes" in flusher.describe()


def test_flusher_reports_a_refused_update_and_goes_on():
    tally = serving_metrics.ServingMetrics([("t", ["a", "b"])], 4, {})
    errors, sent = [], []

    def send(series, d):
        if series.family is serving_metrics.PREDICTIONS:
            raise RuntimeError("refused")
        sent.append(series.family.name)

    flusher = serving_metrics.Flusher(tally, send, on_error=errors.append)
    tally.record_batch({"t": np.array([[0.9, 0.1]], np.float32)}, np.array([False]), [1])
    flusher.flush()
    assert len(errors) == 1 and "mtl_predictions_total" in errors[0] and "refused" in errors[0]
    assert "mtl_request_rows_count" in sent


def test_the_switches_read_the_environment():
    assert serving_metrics.enabled({}) and serving_metrics.enabled({"MTL_METRICS": "on"})
    assert not any(serving_metrics.enabled({"MTL_METRICS": v}) for v in ("off", "0", "false", "NO"))
    assert serving_metrics.flush_interval({}) == serving_metrics.FLUSH_INTERVAL_S
    assert serving_metrics.flush_interval({"MTL_METRICS_FLUSH_S": "0.5"}) == 0.5
    assert serving_metrics.flush_interval({"MTL_METRICS_FLUSH_S": "soon"}) == serving_metrics.FLUSH_INTERVAL_S
    assert serving_metrics.flush_interval({"MTL_METRICS_FLUSH_S": "0"}) == serving_metrics.FLUSH_INTERVAL_S


# -- the real server ---------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_known_requests_move_every_mtl_series_by_exactly_their_counts(local_triton, test_config):
    """Its own server without the watchdog, whose canary inferences would be traffic to this test. A request
    carrying the canary's id is answered but not counted, over gRPC and over HTTP (as the canary sends it)."""
    triton_server = local_triton(watchdog=False)
    model = test_config.serving.model_name
    tasks = tasks_of(test_config)
    long_text = " ".join(["tokens"] * (test_config.backbone.max_tokens * 2))
    accepted = [SENTENCES[:1], SENTENCES[1:3], SENTENCES[3:8], SENTENCES * 2, [long_text, SENTENCES[0]]]
    rejected = {"empty_text": [b" \t "], "invalid_utf8": [b"fine", b"\xff\xfe"]}
    before = scrape(triton_server.metrics_url)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    results = [infer(client, model, [t.encode() for t in rows]) for rows in accepted]
    canary = infer(client, model, [SENTENCES[4].encode()] * 3, request_id=serving_metrics.UNCOUNTED_REQUEST_ID)
    assert canary.as_numpy(tasks[0][0]).shape == (3, len(tasks[0][1]))
    status, body = post_json(
        f"{triton_server.http_url}/v2/models/{model}/infer",
        {
            "id": serving_metrics.UNCOUNTED_REQUEST_ID,
            "inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": SENTENCES[5:7]}],
        },
    )
    assert status == 200 and body.get("id") == serving_metrics.UNCOUNTED_REQUEST_ID, body
    for rows in rejected.values():
        with pytest.raises(grpcclient.InferenceServerException, match="row"):
            infer(client, model, rows)
    client.close()

    after = wait_for(lambda: settled(triton_server.metrics_url, before, len(accepted), rejected), timeout_s=90)
    assert after, "the mtl_* series did not settle within 90 s"

    sizes = [len(rows) for rows in accepted]
    flags = np.concatenate([r.as_numpy("TRUNCATED").reshape(-1) for r in results]).astype(bool)
    assert flags.sum() >= 1  # the long text
    for name, labels in tasks:
        probabilities = np.concatenate([r.as_numpy(name) for r in results])
        best = probabilities.argmax(axis=1)
        for index, label in enumerate(labels):
            assert delta(after, before, "mtl_predictions_total", task=name, label=label) == int((best == index).sum())
        tops = probabilities.max(axis=1).astype(np.float64)
        for bound in (*serving_metrics.TOP_PROBABILITY_BUCKETS, math.inf):
            assert delta(
                after, before, "mtl_top_probability_bucket", task=name, le=serving_metrics.le_label(bound)
            ) == int((tops <= bound).sum()), (name, bound)
        assert delta(after, before, "mtl_top_probability_count", task=name) == sum(sizes)
        assert delta(after, before, "mtl_top_probability_sum", task=name) == pytest.approx(tops.sum(), rel=1e-6)
    assert delta(after, before, "mtl_truncated_rows_total") == int(flags.sum())
    for bound in (*serving_metrics.request_rows_buckets(test_config.serving.max_batch_size), math.inf):
        assert delta(after, before, "mtl_request_rows_bucket", le=serving_metrics.le_label(bound)) == sum(
            1 for s in sizes if s <= bound
        ), bound
    assert delta(after, before, "mtl_request_rows_sum") == sum(sizes)
    assert delta(after, before, "mtl_request_rows_count") == len(sizes)
    for reason in serving_metrics.REJECTION_REASONS:
        assert delta(after, before, "mtl_rejected_requests_total", reason=reason) == (1 if reason in rejected else 0)
    assert delta(after, before, "mtl_failed_requests_total") == 0
    # Every mtl_* series carries the model and version, like Triton's own nv_inference_* series.
    assert all(
        dict(labels).get("model") == model and dict(labels).get("version") == "1"
        for name, labels in after
        if name.startswith("mtl_")
    )


@pytest.mark.e2e
def test_expected_label_share_gauges_equal_metrics_json(triton_server, test_config, version_dir):
    recorded = json.loads((version_dir / "metrics.json").read_text())
    samples = scrape(triton_server.metrics_url)
    for name, labels in tasks_of(test_config):
        for label in labels:
            assert value(samples, "mtl_expected_label_share", task=name, label=label) == pytest.approx(
                recorded["expected_label_share"][name][label]
            )
        assert sum(
            value(samples, "mtl_expected_label_share", task=name, label=label) for label in labels
        ) == pytest.approx(1.0, abs=1e-3)
        median = value(samples, "mtl_expected_top_probability_median", task=name)
        bins = recorded["validation"]["tasks"][name]["reliability"]
        assert median == pytest.approx(serving_metrics.median_from_bins(bins))


@pytest.mark.e2e
def test_metrics_off_publishes_no_mtl_series_and_still_serves(local_triton, test_config, monkeypatch):
    """The benchmark's baseline: MTL_METRICS=off in Triton's environment."""
    monkeypatch.setenv(serving_metrics.ENV_SWITCH, "off")
    server = local_triton()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = infer(client, test_config.serving.model_name, [t.encode() for t in SENTENCES[:3]])
    client.close()
    assert result.as_numpy(test_config.tasks[0].name).shape == (3, len(test_config.tasks[0].labels))
    names = {name for name, _ in scrape(server.metrics_url)}
    assert "nv_inference_request_success" in names
    assert not [name for name in names if name.startswith("mtl_")]
    assert "mtl metrics off" in server.log_text()
