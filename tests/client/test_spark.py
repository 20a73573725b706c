"""mtl_client.spark with a real local PySpark (local[2]) against the real Triton server.

One SparkSession for the module (its start-up is slow). Every label is compared with MultiTaskClient.predict
on the same texts; tasks and labels come from the test project's config, never from constants.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# First, so that a missing extra fails with its install hint (pip install './client[spark]').
from mtl_client.spark import close_clients, predict_dataframe, prediction_udf, shared_client  # isort: skip
import pandas as pd
from pyspark.errors import PythonException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from mtl_client import MultiTaskClient, ServerUnavailableError

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ROWS = 2000
NULL_EVERY = 400  # one row in 400 has a null text


@pytest.fixture(scope="module")
def spark():
    # The workers must run this interpreter (the one with mtl_client, pandas and pyarrow installed).
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .appName("mtl-client-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        # Several Arrow batches per partition, so that requests stream across batch boundaries.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "300")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    close_clients()
    if previous is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = previous


@pytest.fixture(scope="module")
def rows() -> list[tuple[int, str | None]]:
    texts = []
    for split in ("validation", "train"):
        with open(ROOT / "data" / f"{split}.csv", newline="", encoding="utf-8") as handle:
            texts.extend(row["text"] for row in csv.DictReader(handle) if row["text"].strip())
    return [(i, None if i % NULL_EVERY == 7 else texts[i]) for i in range(ROWS)]


@pytest.fixture(scope="module")
def frame(spark, rows):
    schema = StructType([StructField("id", StringType()), StructField("text", StringType())])
    return spark.createDataFrame([(str(i), text) for i, text in rows], schema).repartition(3)


def _served_rows(server, model: str) -> tuple[int, int]:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {"nv_inference_request_success": 0, "nv_inference_count": 0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.partition("{")[0] in found and f'model="{model}"' in name:
            found[name.partition("{")[0]] += int(float(value))
    return found["nv_inference_request_success"], found["nv_inference_count"]


def test_every_row_is_scored_once_with_the_labels_of_the_sdk(spark, frame, rows, triton_server, test_config):
    model = test_config.serving.model_name
    before = _served_rows(triton_server, model)
    scored = predict_dataframe(
        frame, "text", url=triton_server.grpc_url, model=model, probabilities=True, batch_size=64, concurrency=4
    )
    tasks = [task.name for task in test_config.tasks]
    assert scored.columns == ["id", "text", *tasks, "truncated"]
    output = scored.collect()
    requests, inferred = (a - b for a, b in zip(_served_rows(triton_server, model), before, strict=True))
    collected = {row["id"]: row for row in output}
    assert len(output) == len(collected) == ROWS
    texts = [text for _, text in rows if text is not None]
    # Each text sent once: rows beyond them can only be the server watchdog's one-row canaries.
    assert len(texts) <= inferred <= len(texts) + requests - math.ceil(len(texts) / 64), (requests, inferred)

    with MultiTaskClient(triton_server.grpc_url, model) as client:
        reference = iter(client.predict(texts, batch_size=64))
    for index, text in rows:
        row = collected[str(index)]
        assert row["text"] == text
        if text is None:
            assert all(row[task] is None for task in tasks) and row["truncated"] is None
            continue
        expected = next(reference)
        assert row["truncated"] == expected.truncated
        for task in test_config.tasks:
            result = row[task.name]
            assert result["label"] == expected[task.name].label
            assert result["score"] == pytest.approx(expected[task.name].score, abs=1e-4)
            probabilities = result["probabilities"].asDict()
            assert list(probabilities) == list(task.labels)
            assert probabilities == pytest.approx(expected[task.name].probabilities, abs=1e-4)


def test_the_result_type_is_read_from_the_server(triton_server, test_config):
    udf = prediction_udf(triton_server.grpc_url, test_config.serving.model_name)
    fields = udf.returnType.fields
    assert [f.name for f in fields] == [*(task.name for task in test_config.tasks), "truncated"]
    assert all([f.name for f in field.dataType.fields] == ["label", "score"] for field in fields[:-1])
    with_probabilities = prediction_udf(triton_server.grpc_url, test_config.serving.model_name, probabilities=True)
    for task, field in zip(test_config.tasks, with_probabilities.returnType.fields[:-1], strict=True):
        assert [f.name for f in field.dataType["probabilities"].dataType.fields] == list(task.labels)


def test_empty_texts_fail_unless_allowed(spark, triton_server, test_config):
    df = spark.createDataFrame(
        [("a", "A fine sentence about the stock market"), ("b", "   "), ("c", None)], "id string, text string"
    ).coalesce(1)
    udf = prediction_udf(triton_server.grpc_url, test_config.serving.model_name)
    with pytest.raises(PythonException, match="empty text"):
        df.select(udf("text")).collect()
    allowed = prediction_udf(triton_server.grpc_url, test_config.serving.model_name, allow_empty=True)
    result = {r["id"]: r["p"] for r in df.select("id", allowed("text").alias("p")).collect()}
    # Rows without a text get null fields (a pandas UDF cannot return a null struct).
    assert all(value is None for key in ("b", "c") for value in result[key])
    first_task = test_config.tasks[0]
    assert result["a"][first_task.name]["label"] in first_task.labels and result["a"]["truncated"] is False


def test_each_worker_process_keeps_one_client(spark, triton_server):
    options = {"url": triton_server.grpc_url}

    def client_of_each_batch(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import os as worker_os

        from mtl_client.spark import shared_client as worker_shared_client

        for batch in batches:
            yield pd.Series([f"{worker_os.getpid()}:{id(worker_shared_client(options))}"] * len(batch))

    tagged = F.pandas_udf(client_of_each_batch, "string")
    pairs = {r["c"] for r in spark.range(0, 4000, numPartitions=4).select(tagged("id").alias("c")).collect()}
    processes = {pair.split(":")[0] for pair in pairs}
    # Many batches and partitions, but one client per worker process.
    assert len(pairs) == len(processes) >= 1
    client = shared_client(options)
    assert shared_client(options) is client
    close_clients()
    assert client.closed and shared_client(options) is not client
    close_clients()


def test_a_server_that_is_down_is_a_clear_error(spark, frame, local_triton, test_config):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    # Building the UDF reads the contract: a server that is down fails it at once, on the driver.
    with pytest.raises(ServerUnavailableError, match=f"server at {closed} is unavailable"):
        prediction_udf(closed, retries=0)

    server = local_triton()
    udf = prediction_udf(server.grpc_url, test_config.serving.model_name, retries=1)
    server.stop()
    with pytest.raises(PythonException) as info:
        frame.limit(200).select(udf("text")).collect()
    message = str(info.value)
    assert "ServerUnavailableError" in message and server.grpc_url in message and "gave up after 1 retries" in message
