"""The runtimes that can execute the model: torch (the module itself), OpenVINO (int8 graph), ONNX Runtime.

Each takes a tokenized Batch and returns per-task probabilities. Tokenization, chunking, truncation flags and
errors are the served-model object's, shared by all of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from . import files
from .encoder import MultiTaskModel
from .spec import ServingSpec, pick_device, pick_dtype, threads_per_instance
from .text import Batch

log = logging.getLogger("multitask_core")


def tokens_per_forward(device: torch.device) -> int:
    """Padded tokens per forward: about 1k keeps a CPU's working set in cache (measured, docs/benchmarks.md);
    a GPU takes a whole dynamic batch (256 rows x 256 tokens) in one forward."""
    return 65536 if device.type == "cuda" else 1024


def plan_chunks(lengths: np.ndarray, token_cap: int) -> list[np.ndarray]:
    """Row indices per forward: longest first, each chunk at most `token_cap` padded tokens (one row at least)."""
    # Sorted, so each chunk pads only to its own longest row (as SentenceTransformer.encode does).
    order = np.argsort(-lengths, kind="stable")
    chunks, start = [], 0
    while start < len(order):
        count = max(1, token_cap // max(int(lengths[order[start]]), 1))
        chunks.append(order[start : start + count])
        start += count
    return chunks


class Runtime:
    """Runs chunks of similar-length rows; subclasses implement `_forward` on one [rows, width] chunk."""

    name = "?"

    def __init__(self, task_sizes: dict[str, int], token_cap: int):
        self.task_sizes = task_sizes
        self.token_cap = token_cap

    def describe(self) -> str:
        return self.name

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        return self._chunked(batch.ids, batch.mask, batch.lengths, self._forward)

    def _chunked(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, forward) -> dict[str, np.ndarray]:
        out = {name: np.empty((len(lengths), size), dtype=np.float32) for name, size in self.task_sizes.items()}
        for rows in plan_chunks(lengths, self.token_cap):
            width = int(lengths[rows[0]])
            for name, probs in forward(ids[rows, :width], mask[rows, :width]).items():
                out[name][rows] = probs
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, folder: Path, spec: ServingSpec, device: torch.device, dtype: torch.dtype, token_cap: int):
        super().__init__({t.name: len(t.labels) for t in spec.tasks}, token_cap)
        self.device, self.dtype = device, dtype
        self.model = load_torch_model(folder, self.task_sizes, spec.normalize).to(device=device, dtype=dtype).eval()

    def describe(self) -> str:
        threads = f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device}{threads}"

    @torch.inference_mode()
    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        ids_t = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).to(self.device, non_blocking=True)
        return {name: probs.cpu().numpy() for name, probs in self.model(ids_t, mask_t).items()}


def near_ties(probabilities: dict[str, np.ndarray], margin: float) -> np.ndarray:
    """Rows where, for some task, the two most likely labels are less than `margin` apart: where int8 rounding
    can swap them."""
    rows = len(next(iter(probabilities.values())))
    close = np.zeros(rows, dtype=bool)
    for probs in probabilities.values():
        top_two = np.partition(probs, -2, axis=1)[:, -2:]
        close |= (top_two[:, 1] - top_two[:, 0]) < margin
    return close


class OpenVINORuntime(Runtime):
    name = "openvino"

    def __init__(self, model, task_sizes: dict[str, int], threads: int, token_cap: int, float_model=None, margin=0.0):
        """`model`: the int8 IR file's path, or an in-memory openvino.Model (the build checks one before saving it).
        With `float_model` (the float32 graph) and a `margin`, rows the int8 graph calls a near tie (its two most
        likely labels of a task less than `margin` apart) are run again in float32, whose answer is kept."""
        import openvino as ov

        super().__init__(task_sizes, token_cap)
        core = ov.Core()
        # LATENCY: one stream with all of this instance's threads; Triton's instances give the parallelism.
        settings = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", settings)
        self.request = self.compiled.create_infer_request()
        self.margin = margin if float_model is not None else 0.0
        if self.margin > 0:
            # f32, not the CPU plugin's default bfloat16 on a CPU that has it: the recheck must give float32 labels.
            self.float_compiled = core.compile_model(float_model, "CPU", settings | {"INFERENCE_PRECISION_HINT": "f32"})
            self.float_request = self.float_compiled.create_infer_request()
        self.threads = threads
        self.version = ov.get_version().split("-")[0]
        self.rows_seen = self.rows_rechecked = 0

    def describe(self) -> str:
        recheck = f", near ties (margin {self.margin:g}) run again in float32" if self.margin > 0 else ""
        return f"openvino int8 on CPU ({self.threads} threads, OpenVINO {self.version}){recheck}"

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        out = super().run(batch)
        self.rows_seen += len(batch.lengths)
        if self.margin > 0:
            rows = np.flatnonzero(near_ties(out, self.margin))
            if len(rows):
                again = self._chunked(batch.ids[rows], batch.mask[rows], batch.lengths[rows], self._forward_float)
                for name in out:
                    out[name][rows] = again[name]
                self.rows_rechecked += len(rows)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._outputs(self.compiled, self.request.infer({"ids": ids, "mask": mask}))

    def _forward_float(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._outputs(self.float_compiled, self.float_request.infer({"ids": ids, "mask": mask}))

    def _outputs(self, compiled, results) -> dict[str, np.ndarray]:
        return {name: np.asarray(results[compiled.output(name)], dtype=np.float32) for name in self.task_sizes}


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, folder: Path, spec: ServingSpec, device: torch.device, threads: int, token_cap: int):
        import onnxruntime as ort

        super().__init__({t.name: len(t.labels) for t in spec.tasks}, token_cap)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        self.session = ort.InferenceSession(str(folder / files.ONNX_FILE), options, providers=providers)
        self.provider = self.session.get_providers()[0]

    def describe(self) -> str:
        return f"onnxruntime float32 ({self.provider})"

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(self.task_sizes), {"ids": ids, "mask": mask})
        return dict(zip(self.task_sizes, outputs))


def load_torch_model(folder: Path, task_sizes: dict[str, int], normalize: bool) -> MultiTaskModel:
    from safetensors.torch import load_file

    encoder_cfg = json.loads((folder / files.ENCODER_CONFIG_FILE).read_text())
    model = MultiTaskModel(encoder_cfg, task_sizes, normalize)
    model.load_state_dict(load_file(str(folder / files.WEIGHTS_FILE)), strict=True)
    return model


def pick_runtime(setting: str, device: torch.device, folder: Path) -> str:
    """auto: the OpenVINO int8 graph on a CPU when the build exported one, torch otherwise (fp16 on a GPU)."""
    if setting != "auto":
        return setting
    if device.type == "cpu" and (folder / files.OPENVINO_FILE).is_file():
        return "openvino"
    return "torch"


def open_runtime(
    folder: Path,
    spec: ServingSpec,
    *,
    runtime: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    token_cap: int | None = None,
) -> Runtime:
    """The runtime the spec asks for (arguments override it), with its device, dtype, threads and token cap."""
    torch_device = pick_device(device or spec.device)
    chosen = pick_runtime(runtime or spec.runtime, torch_device, folder)
    cap = token_cap or spec.tokens_per_forward or tokens_per_forward(torch_device)
    if threads is None:
        threads = spec.threads or threads_per_instance(spec.instance_count, torch.get_num_threads())
    if chosen == "torch":
        if torch_device.type == "cpu":
            torch.set_num_threads(threads)
        return TorchRuntime(folder, spec, torch_device, pick_dtype(torch_device, precision or spec.precision), cap)
    if chosen == "openvino":
        if torch_device.type != "cpu":
            raise ValueError("runtime openvino runs on the CPU only; set serving.device: cpu or another runtime")
        settings = files.read_int8_settings(folder)
        margin = float(settings.get("recheck_margin", 0.0))
        return OpenVINORuntime(
            str(folder / files.OPENVINO_FILE),
            {t.name: len(t.labels) for t in spec.tasks},
            threads,
            cap,
            float_model=str(folder / files.ONNX_FILE) if margin > 0 else None,
            margin=margin,
        )
    if chosen == "onnxruntime":
        return OnnxRuntime(folder, spec, torch_device, threads, cap)
    raise ValueError(f"unknown runtime {chosen!r}")
