"""Triton python-backend adapter: every request of a dynamic batch goes through one tokenize + forward.

The computation lives in multitask_core.py (tested without Triton); this file only moves tensors
between Triton and it, and turns a bad row into that request's INVALID_ARG error.
"""
import json
import sys
from pathlib import Path

import numpy as np

# The bundled stub (pybind11 2.10) misreads numpy 2 arrays and dies on the first BYTES request:
# refuse to load rather than serve a model that crashes (shared/triton-local.md).
if int(np.__version__.split(".")[0]) >= 2:
    raise ImportError(f"the Triton python stub needs numpy<2, found {np.__version__} at {np.__file__}")

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask_core as core  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        core.verify_artifacts(folder)
        model_config = json.loads(args["model_config"])
        self.spec = core.ServingSpec.from_model_config(model_config)
        self.device = core.pick_device(self.spec.device)
        if self.device.type == "cpu":
            torch.set_num_threads(core.threads_per_instance(model_config, torch.get_num_threads()))
        # float16 on a GPU, bfloat16 on an AMX CPU (serving.precision auto): about twice as fast, same labels.
        dtype = core.pick_dtype(self.device, self.spec.precision)
        self.model = core.load_model(folder, self.spec, self.device, dtype)
        # Padded tokens per forward: small on a CPU (cache), a whole dynamic batch on a GPU.
        self.token_budget = core.forward_token_budget(self.device)
        self.tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, self.spec.max_tokens)
        self.task_names = [task.name for task in self.spec.tasks]
        pb_utils.Logger.log_info(
            f"multitask ready: device={self.device} dtype={dtype} threads={torch.get_num_threads()} "
            f"tasks={self.task_names} max_tokens={self.spec.max_tokens} numpy={np.__version__} torch={torch.__version__}"
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        texts, counts, accepted = [], [], []
        for index, request in enumerate(requests):
            try:
                rows = core.decode_texts(pb_utils.get_input_tensor_by_name(request, core.INPUT_NAME).as_numpy())
            except core.RowError as exc:
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            texts.extend(rows)
            counts.append(len(rows))
            accepted.append(index)
        if not texts:
            return responses
        try:
            batch = core.tokenize(self.tokenizer, texts, self.spec.max_tokens)
            probabilities = core.predict_probabilities(self.model, batch, self.device, self.token_budget)
        except Exception as exc:  # noqa: BLE001 - one failed batch must not take the instance down
            pb_utils.Logger.log_error(f"inference failed for {len(texts)} rows: {exc!r}")
            for index in accepted:
                responses[index] = _error(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
            return responses
        for index, rows in zip(accepted, core.row_slices(counts)):
            outputs = [pb_utils.Tensor(name, probabilities[name][rows]) for name in self.task_names]
            outputs.append(pb_utils.Tensor(core.TRUNCATED_NAME, batch.truncated[rows].reshape(-1, 1)))
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses


def _error(message, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
