"""Batch scoring with Spark: a pandas UDF that sends a text column to the Triton server (or replicas).

    from mtl_client.spark import predict_dataframe
    scored = predict_dataframe(df, "text", url="triton-0:8001,triton-1:8001", probabilities=True)
    scored.select("id", "topic.label", "sentiment.score")

Install with `pip install ./client[spark]`; Spark itself needs Java 17. Tasks and labels are read from the
server when the UDF is built, so its result type is the served model's. Each Spark Python worker keeps one
MultiTaskClient (`shared_client`) for all its batches, with `concurrency` requests in flight; the workers
of an executor each have their own. Scale-out arithmetic: docs/scale.md.
"""

from __future__ import annotations

import atexit
import json
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

try:
    import pandas as pd
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, FloatType, StringType, StructField, StructType
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"mtl_client.spark needs PySpark, pandas and pyarrow: pip install './client[spark]' ({exc})"
    ) from exc

from .base import DEFAULT_MODEL, DEFAULT_URL
from .client import MultiTaskClient
from .contract import ModelContract
from .endpoints import contract_difference
from .errors import InvalidInputError, ModelContractError
from .predictions import Prediction
from .texts import EMPTY_TEXT, has_content

TRUNCATED_FIELD = "truncated"

_CLIENTS: dict[str, MultiTaskClient] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(options: dict[str, Any]) -> MultiTaskClient:
    """This process's client for `options` (MultiTaskClient's arguments): made once, reused by every batch."""
    key = json.dumps(options, sort_keys=True, default=str)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None or client.closed:
            client = _CLIENTS[key] = MultiTaskClient(**options)
        return client


@atexit.register
def close_clients() -> None:
    """Close every shared client (at interpreter exit; Spark's forked workers end with os._exit instead,
    and the OS closes their connections)."""
    with _CLIENTS_LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close()


def result_schema(contract: ModelContract, probabilities: bool = False) -> StructType:
    """struct<task: struct<label, score[, probabilities: struct<label: float ...>]> ..., truncated>."""
    if TRUNCATED_FIELD in contract.task_names:
        raise ModelContractError(f"a task is named '{TRUNCATED_FIELD}', the name of the truncation flag column")
    fields = []
    for task in contract.tasks:
        parts = [StructField("label", StringType()), StructField("score", FloatType())]
        if probabilities:
            parts.append(
                StructField("probabilities", StructType([StructField(label, FloatType()) for label in task.labels]))
            )
        fields.append(StructField(task.name, StructType(parts)))
    fields.append(StructField(TRUNCATED_FIELD, BooleanType()))
    return StructType(fields)


def prediction_udf(
    url: str | Sequence[str] = DEFAULT_URL,
    model: str = DEFAULT_MODEL,
    *,
    probabilities: bool = False,
    batch_size: int = 64,
    allow_empty: bool = False,
    **client_options,
):
    """A pandas UDF scoring a string column: one struct per row with a field per task (label, score and,
    with `probabilities`, each label's probability) and `truncated`.

    The contract is read from the server now (ServerUnavailableError here if it cannot be reached), and
    checked again by each worker's client. A null text gives null fields (every task and `truncated`)
    without a request; an empty one (nothing visible) too with `allow_empty`, and InvalidInputError
    otherwise. `client_options` are MultiTaskClient's (timeout_s, retries, concurrency, headers, TLS files,
    channel_args, ...).
    """
    options = {"url": url, "model": model, **client_options}
    with MultiTaskClient(**options) as client:
        contract = client.get_contract()
        client.settings.max_rows(batch_size, contract)  # a bad batch_size fails here, not on every worker
    schema = result_schema(contract, probabilities)

    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        worker_client = shared_client(options)
        served = worker_client.get_contract()
        if served != contract:
            raise ModelContractError(
                f"the model at {worker_client.url} changed since the UDF was built: "
                f"{contract_difference(contract, served)}"
            )
        yield from score_batches(worker_client, batches, contract, probabilities, batch_size, allow_empty)

    # Non-deterministic, so that Spark never runs it twice for one row when several fields are selected.
    return F.pandas_udf(score, schema).asNondeterministic()


def predict_dataframe(
    df: DataFrame,
    text_column: str = "text",
    url: str | Sequence[str] = DEFAULT_URL,
    model: str = DEFAULT_MODEL,
    *,
    prefix: str = "",
    **options,
) -> DataFrame:
    """`df` with one struct column per task (named `prefix` + task) and `prefix`truncated; `options` as
    prediction_udf's."""
    udf = prediction_udf(url, model, **options)
    scored = "__mtl_prediction"
    while scored in df.columns:
        scored += "_"
    fields = [field.name for field in udf.returnType.fields]
    return df.withColumn(scored, udf(F.col(text_column))).select(
        *[F.col(name) for name in df.columns], *[F.col(scored)[name].alias(prefix + name) for name in fields]
    )


def score_batches(
    client: MultiTaskClient,
    batches: Iterator[pd.Series],
    contract: ModelContract,
    probabilities: bool,
    batch_size: int,
    allow_empty: bool,
) -> Iterator[pd.DataFrame]:
    """One frame per input batch, in order, while requests stream across batch boundaries."""
    sizes: deque[int] = deque()
    columns = [*contract.task_names, TRUNCATED_FIELD]

    def items():
        for series in batches:
            sizes.append(len(series))
            for position, text in enumerate(series):
                if text is None or (not isinstance(text, str) and pd.isna(text)):
                    yield None, None
                elif not has_content(text):
                    if not allow_empty:
                        raise InvalidInputError(
                            f"row {position} of a Spark batch has an {EMPTY_TEXT} "
                            "(filter such rows, or pass allow_empty=True to get a null result for them)",
                            reason=EMPTY_TEXT,
                        )
                    yield None, None
                else:
                    yield None, text

    rows: list[dict | None] = []
    for _, prediction in client.predict_items(items(), batch_size):
        rows.append(None if prediction is None else _record(prediction, probabilities))
        while sizes and len(rows) >= sizes[0]:
            yield _frame(rows, sizes.popleft(), columns)
    while sizes:  # empty batches at the end
        yield _frame(rows, sizes.popleft(), columns)


def _record(prediction: Prediction, probabilities: bool) -> dict:
    record: dict[str, Any] = {}
    for name, result in prediction.tasks.items():
        task = {"label": result.label, "score": result.score}
        if probabilities:
            task["probabilities"] = dict(result.probabilities)
        record[name] = task
    record[TRUNCATED_FIELD] = prediction.truncated
    return record


def _frame(rows: list[dict | None], count: int, columns: list[str]) -> pd.DataFrame:
    taken = rows[:count]
    del rows[:count]
    empty = dict.fromkeys(columns)
    return pd.DataFrame([row if row is not None else empty for row in taken], columns=columns)
