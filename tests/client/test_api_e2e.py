"""The Python API as the README shows it, sync and async, against the real Triton server."""

import asyncio
import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mtl_client import AsyncMultiTaskClient, InvalidInputError, ModelNotFoundError, MultiTaskClient, Prediction
from mtl_client.errors import translate

pytestmark = pytest.mark.e2e
TEXTS = [
    "The quarterly earnings report sent the bank's shares soaring to a record high",
    "This phone update drains my battery in two hours, absolutely useless",
    "The band's new album is a joyful, beautifully produced masterpiece",
    "The central bank left interest rates unchanged",
    "The sequel was a boring, predictable mess",
]


@pytest.fixture(scope="module")
def labels(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        config = client.get_model_config("multitask", as_json=True)["config"]
    return {t["name"]: t["labels"] for t in json.loads(config["parameters"]["tasks"]["string_value"])}


def _same(a: list[Prediction], b: list[Prediction]) -> None:
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.labels for p in a] == [p.labels for p in b]
    for x, y in zip(a, b):
        for task in x:
            assert np.allclose(list(x[task].probabilities.values()), list(y[task].probabilities.values()), atol=1e-4)


def test_readme_sync_usage(triton_server, labels):
    with MultiTaskClient(triton_server.grpc_url, headers={"X-Request-Source": "tests"}) as client:
        health = client.wait_until_ready(timeout_s=30)
        assert health.ok
        predictions = client.predict(TEXTS)
        info = client.info()
    assert info.server_name == "triton" and info.model_versions and info.contract.max_batch_size > 0
    assert {t.name: list(t.labels) for t in info.contract.tasks} == labels
    assert [p.text for p in predictions] == TEXTS
    for prediction in predictions:
        assert prediction.truncated is False
        for task, task_labels in labels.items():
            result = prediction[task]
            assert result.label in task_labels and result.label == prediction.tasks[task].label
            assert list(result.probabilities) == task_labels
            assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
            assert result.score == max(result.probabilities.values())
    # Clear-cut topics (as the server's own tests check them).
    assert [p["topic"].label for p in predictions[:3]] == ["finance", "tech", "entertainment"]


def test_predict_iter_streams_lazily_in_order(triton_server):
    pulled = []

    def source():
        for i in range(400):
            pulled.append(i)
            yield f"{TEXTS[i % len(TEXTS)]} #{i}"

    with MultiTaskClient(triton_server.grpc_url, concurrency=2) as client:
        stream = client.predict_iter(source(), batch_size=8)
        first = next(stream)
        # Only a bounded window was read: 2 x concurrency batches of 8, plus one text to close a batch.
        assert len(pulled) <= 2 * 2 * 8 + 1
        rest = list(stream)
        whole = client.predict([f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(400)], batch_size=256)
    streamed = [first, *rest]
    assert [p.text for p in streamed] == [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(400)]
    _same(streamed, whole)


def test_async_twin(triton_server):
    async def main():
        async with AsyncMultiTaskClient(triton_server.grpc_url, concurrency=3) as client:
            await client.wait_until_ready(timeout_s=30)
            batch = await client.predict(TEXTS * 4, batch_size=3)

            async def texts():
                for text in TEXTS * 4:
                    yield text

            streamed = [p async for p in client.predict_iter(texts(), batch_size=2)]
            from_list = [p async for p in client.predict_iter(TEXTS * 4, batch_size=5)]
            info = await client.info()
            health = await client.health()
            return batch, streamed, from_list, info, health

    batch, streamed, from_list, info, health = asyncio.run(main())
    assert health.ok and info.contract.task_names
    with MultiTaskClient(triton_server.grpc_url) as client:
        reference = client.predict(TEXTS * 4)
    for predictions in (batch, streamed, from_list):
        _same(predictions, reference)


def test_invalid_texts_are_refused_before_sending(triton_server):
    with MultiTaskClient(triton_server.grpc_url) as client:
        with pytest.raises(InvalidInputError) as info:
            client.predict(["fine", "", "ok", "  "])
        assert info.value.indices == (1, 3) and info.value.count == 2
        with pytest.raises(InvalidInputError, match=r"texts\[5\]: empty text \(nothing but whitespace"):
            list(client.predict_iter(iter(["good text"] * 5 + ["\n"]), batch_size=2))

    async def refused():
        async with AsyncMultiTaskClient(triton_server.grpc_url) as client:
            await client.predict(["fine", " "])

    with pytest.raises(InvalidInputError, match="at index 1"):
        asyncio.run(refused())


def test_server_rejections_map_to_the_callers_row(triton_server):
    """A real INVALID_ARG from the server (sent past the client's checks) names the caller's index."""
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as raw:
        tensor = grpcclient.InferInput("TEXT", [3, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"fine"], [b"also fine"], [b"\xff\xfe"]], dtype=object))
        with pytest.raises(InferenceServerException) as info:
            raw.infer("multitask", [tensor])
    error = translate(info.value, url=triton_server.grpc_url, model="multitask", rows=[10, 11, 12])
    assert isinstance(error, InvalidInputError) and error.index == 12
    assert str(error) == "texts[12]: invalid UTF-8 at byte 0"


def test_unknown_model(triton_server):
    with MultiTaskClient(triton_server.grpc_url, model="nope") as client:
        with pytest.raises(ModelNotFoundError, match="does not serve model 'nope'"):
            client.predict(["hello"])
        assert client.health().model_ready is False
