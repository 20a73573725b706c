"""Served outputs through the real Triton server equal eager transformers on the same weights."""
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from mtl_build.backbone import verify_backbone
from mtl_build.config import load_config
from mtl_build.serving_core import core
from mtl_build.train import EagerMultiTask

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
# fp32 on the same CPU: differences come only from operation order (SDPA vs eager attention).
TOLERANCE = 1e-4


def _texts(count: int, long: bool) -> list[str]:
    sentences = [
        "Streaming revenue beat forecasts while the studio's new series topped the charts",
        "My laptop fan screams every time I open a browser tab",
        "The central bank left rates unchanged",
        "What a gorgeous, moving soundtrack",
    ]
    texts = [f"{sentences[i % 4]} (item {i})" for i in range(count)]
    if long:  # well past 256 tokens, so the server truncates
        texts = [text + " and the analysts kept talking about it" * 60 for text in texts]
    return texts


@pytest.fixture(scope="module")
def eager(built_repository):
    config = load_config(ROOT / "config.yaml")
    backbone = verify_backbone(config.backbone)
    model = EagerMultiTask.from_exported(built_repository / "multitask" / "1", backbone, config.tasks)
    tokenizer = core.load_tokenizer(backbone / core.TOKENIZER_FILE, config.backbone.max_tokens)
    return model, tokenizer, config


def _served(server, texts):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("topic", "sentiment", "TRUNCATED")]
        result = client.infer("multitask", [tensor], outputs=outputs)
        return {n: result.as_numpy(n) for n in ("topic", "sentiment", "TRUNCATED")}


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("long", [False, True], ids=["short", "over-256-tokens"])
def test_served_probabilities_match_eager_transformers(triton_server, eager, rows, long):
    model, tokenizer, config = eager
    texts = _texts(rows, long)
    served = _served(triton_server, texts)
    # Eager reference: each row alone, unpadded, through transformers' BertModel.
    for i, text in enumerate(texts):
        batch = core.tokenize(tokenizer, [text], config.backbone.max_tokens)
        with torch.inference_mode():
            logits = model(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
        for task in ("topic", "sentiment"):
            expected = torch.softmax(logits[task], -1).numpy()[0]
            assert np.abs(served[task][i] - expected).max() <= TOLERANCE, (task, i, served[task][i], expected)
        assert bool(served["TRUNCATED"][i, 0]) == long
