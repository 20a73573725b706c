"""The in-process peers: what a user could run instead of the server, each loaded from the same local encoder files.

Each peer turns texts into the encoder's sentence embeddings (mean pooling, L2-normalised), as
`SentenceTransformer.encode(texts, batch_size=64)` does: sorted by length, 64 per forward, back in input order.
The exported graphs are the plain encoder with its pooling and normalisation (no heads), made here from the
sentence-transformers folder: sentence-transformers' own `backend="onnx"/"openvino"` needs optimum, which this
environment does not have. They are made once and cached (see `PeerFiles`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH = 64  # sentences per forward, as SentenceTransformer.encode's batch_size
ONNX_OPSET = 17
CALIBRATION_TEXTS = 300
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# name -> what it is; the order is the report's.
PEERS = {
    "st-float32": "sentence-transformers float32: SentenceTransformer(path, device).encode(texts, batch_size=64)",
    "st-bfloat16": "sentence-transformers bfloat16: the same after model.to(torch.bfloat16) (CPU)",
    "st-float16": "sentence-transformers float16: the same after model.to(torch.float16) (GPU)",
    "ort-int8": "ONNX Runtime dynamic int8: the encoder's float32 ONNX through onnxruntime.quantization."
    "quantize_dynamic (per-channel int8 weights, dynamic int8 activations; VNNI on a CPU that has it)",
    "ov-int8": f"OpenVINO static int8: the encoder's IR quantized by NNCF on {CALIBRATION_TEXTS} data/train.csv texts",
    "ov-default": "OpenVINO float IR compiled with the CPU plugin's defaults (bfloat16 inference on AVX512-BF16/AMX)",
}
REFERENCE_PEER = "st-float32"


def default_peers(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["st-float32", "st-float16"]
    return ["st-float32", "st-bfloat16", "ort-int8", "ov-int8"]


def load_sentence_transformer(path: Path, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)


def length_sorted_batches(texts: list[str], size: int = BATCH) -> tuple[np.ndarray, list[list[str]]]:
    """SentenceTransformer.encode's order: longest text first (by characters), then batches of `size`."""
    order = np.argsort([-len(text) for text in texts], kind="stable")
    return order, [[texts[i] for i in order[start : start + size]] for start in range(0, len(order), size)]


def in_input_order(order: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    out = np.empty_like(embeddings)
    out[order] = embeddings
    return out


@dataclass
class Peer:
    name: str
    encode: Callable[[list[str]], np.ndarray]  # texts -> float32 [rows, dim] embeddings, input order
    detail: str


class SentenceTransformerPeer:
    def __init__(self, model, dtype=None):
        import torch

        self.model = model if dtype is None else model.to(dtype)
        self.dtype = dtype or torch.float32

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = self.model.encode(texts, batch_size=BATCH, convert_to_tensor=True)
        return out.to(torch.float32).cpu().numpy()


def st_features(st_model, batch: list[str]) -> dict[str, np.ndarray]:
    """sentence-transformers' own tokenization of a batch (padded to its longest row), as int64 arrays."""
    features = st_model.preprocess(batch)
    return {name: features[name].numpy().astype(np.int64) for name in INPUTS if name in features}


class GraphPeer:
    """An exported encoder graph fed exactly as SentenceTransformer.encode feeds its torch module."""

    def __init__(self, st_model, run: Callable[[dict[str, np.ndarray]], np.ndarray]):
        self.st_model, self.run = st_model, run

    def encode(self, texts: list[str]) -> np.ndarray:
        order, batches = length_sorted_batches(texts)
        parts = [np.asarray(self.run(st_features(self.st_model, b)), dtype=np.float32) for b in batches]
        return in_input_order(order, parts)


def _mean_pooled_encoder(st_model):
    """The sentence-transformers pipeline as one module: transformer, mean pooling over the mask, L2 norm."""
    import torch
    import torch.nn.functional as F

    transformer = st_model[0].auto_model.float().eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=1)

    return Encoder().eval()


def file_sha256(path: Path) -> str:
    from multitask_core.files import sha256_file

    return sha256_file(path)


class PeerFiles:
    """The peers' exported graphs, made once per encoder, calibration set and library versions.

    <cache>/bench-peers/<key>/: encoder.onnx (float32), encoder_int8_dynamic.onnx, encoder_int8.xml/.bin,
    export.json (seconds each step took)."""

    def __init__(self, st_path: Path, st_model, calibration: list[str], cache: Path, log=print):
        from importlib.metadata import version

        self.st_path, self.st_model, self.calibration, self.log = st_path, st_model, calibration, log
        weights = next(
            st_path / name for name in ("model.safetensors", "pytorch_model.bin") if (st_path / name).is_file()
        )
        parts = [file_sha256(weights)] + [
            version(p) for p in ("torch", "onnx", "onnxruntime", "openvino", "nncf") if _installed(p)
        ]
        parts.append(hashlib.sha256("\n".join(calibration).encode()).hexdigest())
        self.folder = cache / "bench-peers" / hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.record_path = self.folder / "export.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}

    def _made(self, name: str, make: Callable[[Path], None]) -> Path:
        path = self.folder / name
        if not path.is_file():
            started = time.perf_counter()
            staging = self.folder / f".{name}.{os.getpid()}"
            make(staging)
            staging.replace(path)
            self.record[name] = round(time.perf_counter() - started, 1)
            self.record_path.write_text(json.dumps(self.record, indent=2) + "\n")
            self.log(f"bench: made {path} in {self.record[name]}s")
        return path

    def onnx_float32(self) -> Path:
        def make(target: Path) -> None:
            import torch

            sample = self.features(
                ["An example sentence to trace.", "A second, longer example sentence for the export."]
            )
            # The tracer's warnings are about branches that are constant for these inputs (no padding past the mask).
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _mean_pooled_encoder(self.st_model),
                    tuple(torch.from_numpy(sample[n]) for n in INPUTS),
                    str(target),
                    input_names=list(INPUTS),
                    output_names=["embedding"],
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                    dynamic_axes={**{n: {0: "rows", 1: "width"} for n in INPUTS}, "embedding": {0: "rows"}},
                )

        return self._made("encoder.onnx", make)

    def onnx_int8_dynamic(self) -> Path:
        def make(target: Path) -> None:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(self.onnx_float32()), str(target), weight_type=QuantType.QInt8, per_channel=True)

        return self._made("encoder_int8_dynamic.onnx", make)

    def openvino_int8(self) -> Path:
        def make(target: Path) -> None:
            import contextlib
            import io
            import logging

            import nncf
            import openvino as ov

            nncf.set_log_level(logging.ERROR)
            texts = self.calibration[:CALIBRATION_TEXTS]
            # Batches of 8 padded texts: the activation ranges of padded batches, as the peer runs them.
            items = [self.features(texts[i : i + 8]) for i in range(0, len(texts), 8)]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
                quantized = nncf.quantize(
                    ov.convert_model(str(self.onnx_float32())),
                    nncf.Dataset(items),
                    model_type=nncf.ModelType.TRANSFORMER,
                    subset_size=len(texts),
                )
            xml = target.with_suffix(".xml")
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
            xml.with_suffix(".bin").replace(self.folder / "encoder_int8.bin")
            xml.replace(target)

        return self._made("encoder_int8.xml", make)

    def features(self, batch: list[str]) -> dict[str, np.ndarray]:
        return st_features(self.st_model, batch)


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def onnxruntime_runner(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda features: session.run(None, {n: features[n] for n in names})[0]


def openvino_runner(path: Path, threads: int) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], str]:
    """(the graph's forward, the inference precision the CPU plugin chose for its floating-point parts)."""
    import openvino as ov

    # LATENCY: one stream on all the threads, as the served OpenVINO runtime runs each instance.
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return (lambda features: request.infer(features)[output]), compiled.get_property(
        "INFERENCE_PRECISION_HINT"
    ).to_string()


def load_peers(
    names: list[str], st_path: Path, device: str, threads: int, calibration: list[str], cache: Path, log=print
) -> tuple[dict[str, Peer], dict]:
    """The named peers, ready to encode; and what making their files took (seconds, from the cache record)."""
    import torch

    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    peers: dict[str, Peer] = {}
    files = None
    for name in names:
        st_model = load_sentence_transformer(st_path, device)
        if name in ("st-float32", "st-bfloat16", "st-float16"):
            dtype = {"st-float32": None, "st-bfloat16": torch.bfloat16, "st-float16": torch.float16}[name]
            peer = SentenceTransformerPeer(st_model, dtype)
            peers[name] = Peer(name, peer.encode, f"{str(peer.dtype).removeprefix('torch.')} on {device}")
            continue
        if device != "cpu":
            raise ValueError(f"peer {name} runs on the CPU only; choose st-float32,st-float16 for --device {device}")
        files = files or PeerFiles(st_path, st_model, calibration, cache, log)
        if name == "ort-int8":
            graph = files.onnx_int8_dynamic()
            peers[name] = Peer(
                name,
                GraphPeer(st_model, onnxruntime_runner(graph, threads)).encode,
                f"{graph.name}, {threads} intra-op threads",
            )
        else:
            graph = files.openvino_int8() if name == "ov-int8" else files.onnx_float32()
            runner, precision = openvino_runner(graph, threads)
            peers[name] = Peer(
                name,
                GraphPeer(st_model, runner).encode,
                f"{graph.name}, {threads} threads, LATENCY hint, float parts in {precision}",
            )
    return peers, {"folder": str(files.folder), "seconds": files.record} if files else {}
