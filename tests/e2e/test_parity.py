"""Served outputs through the real Triton server equal eager transformers on the same weights."""

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from mtl_build.backbone import verify_backbone
from mtl_build.evaluate import TransformersReference
from multitask_core.spec import INPUT_NAME, TRUNCATED_NAME
from multitask_core.text import TextEncoder

pytestmark = pytest.mark.e2e
# fp32 on the same CPU: differences come only from operation order (SDPA vs eager attention).
TOLERANCE = 1e-4


def _texts(count: int, long: bool, max_tokens: int) -> list[str]:
    sentences = [
        "Streaming revenue beat forecasts while the studio's new series topped the charts",
        "My laptop fan screams every time I open a browser tab 😤",
        "The central bank left rates unchanged",
        "What a gorgeous, moving soundtrack",
    ]
    texts = [f"{sentences[i % 4]} (item {i})" for i in range(count)]
    if long:  # well past the token limit, so the server truncates
        texts = [text + " and the analysts kept talking about it" * (max_tokens // 4) for text in texts]
    return texts


@pytest.fixture(scope="module")
def reference(version_dir, test_config):
    backbone = verify_backbone(test_config.backbone)
    model = TransformersReference(version_dir, backbone, test_config.backbone.normalize)
    return model, TextEncoder(version_dir / "tokenizer.json", test_config.backbone.max_tokens)


def _served(server, model_name, texts, names):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput(INPUT_NAME, [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        result = client.infer(model_name, [tensor], outputs=outputs)
        return {n: result.as_numpy(n) for n in names}


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("long", [False, True], ids=["short", "over-the-token-limit"])
def test_served_probabilities_match_eager_transformers(triton_server, reference, test_config, rows, long):
    model, text = reference
    tasks = [task.name for task in test_config.tasks]
    texts = _texts(rows, long, test_config.backbone.max_tokens)
    served = _served(triton_server, test_config.serving.model_name, texts, [*tasks, TRUNCATED_NAME])
    # Eager reference: each row alone, unpadded, through transformers' BertModel (same normalisation and limit).
    for i, sentence in enumerate(texts):
        batch = text.encode([sentence])
        expected = model(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
        for task in tasks:
            assert np.abs(served[task][i] - expected[task].numpy()[0]).max() <= TOLERANCE, (task, i)
        assert bool(served[TRUNCATED_NAME][i, 0]) == long
