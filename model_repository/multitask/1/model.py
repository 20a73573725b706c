"""Triton python-backend adapter: every request of a dynamic batch goes through one tokenize + forward.

Everything the model computes lives in multitask_core.ServedModel (tested without Triton); this file only
moves tensors between Triton and it, turns a bad row into that request's INVALID_ARG error, and publishes
what multitask_core.metrics counted as mtl_* series on Triton's metrics endpoint (docs/metrics.md).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

# The bundled stub (pybind11 2.10) misreads numpy 2 arrays and dies on the first BYTES request:
# refuse to load rather than serve a model that crashes (docs/triton-local.md).
if int(np.__version__.split(".")[0]) >= 2:
    raise ImportError(f"the Triton python stub needs numpy<2, found {np.__version__} at {np.__file__}")

import triton_python_backend_utils as pb_utils

# The core package sits beside this file; Triton does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitask_core import metrics as serving_metrics
from multitask_core.served import ServedModel, row_slices
from multitask_core.spec import INPUT_NAME, TRUNCATED_NAME


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.served = ServedModel.open(folder, config)
        self._open_metrics(args, folder, config)
        pb_utils.Logger.log_info(f"multitask ready: {self.served.describe()}; numpy {np.__version__}")

    def execute(self, requests):
        responses = [None] * len(requests)
        texts, counts, accepted, counted = [], [], [], []
        for index, request in enumerate(requests):
            try:
                rows = self.served.decode(pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy())
            except ValueError as exc:  # RowError names the row; an empty request says so
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
                self.metrics.record_rejection(serving_metrics.rejection_reason(exc))
                continue
            texts.extend(rows)
            counts.append(len(rows))
            accepted.append(index)
            counted.append(request.request_id() != serving_metrics.UNCOUNTED_REQUEST_ID)
        if not texts:
            return responses
        try:
            batch = self.served.encode(texts)
            probabilities = self.served.run(batch)
        except Exception as exc:  # one failed batch must not take the instance down
            pb_utils.Logger.log_error(f"inference failed for {len(texts)} rows: {exc!r}")
            for index in accepted:
                responses[index] = _error(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
            self.metrics.record_failure(len(accepted))
            return responses
        self.metrics.record_batch(probabilities, batch.truncated, counts, counted)
        for index, rows in zip(accepted, row_slices(counts)):
            outputs = [pb_utils.Tensor(name, probabilities[name][rows]) for name in self.served.task_names]
            outputs.append(pb_utils.Tensor(TRUNCATED_NAME, batch.truncated[rows].reshape(-1, 1)))
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    def finalize(self):
        if self._flusher is not None:
            self._flusher.stop()
            pb_utils.Logger.log_info(f"mtl metrics: {self._flusher.describe()}")
        # The python backend wants each Metric deleted before its MetricFamily.
        self._metric_handles = {}
        self._metric_families = {}

    # -- metrics (counting in multitask_core.metrics; only Triton's registration and updates here) -----------
    def _open_metrics(self, args, folder, config):
        self.metrics, self._flusher, self._metric_handles, self._metric_families = (
            serving_metrics.DisabledMetrics(),
            None,
            {},
            {},
        )
        if not serving_metrics.enabled(os.environ):
            pb_utils.Logger.log_info(f"mtl metrics off ({serving_metrics.ENV_SWITCH})")
            return
        tasks = [(task.name, task.labels) for task in self.served.spec.tasks]
        constant = {"model": args["model_name"], "version": args["model_version"]}
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        self._metric_families = {
            family.name: pb_utils.MetricFamily(
                name=family.name, description=family.description, kind=kinds[family.kind]
            )
            for family in serving_metrics.FAMILIES
        }
        tally = serving_metrics.ServingMetrics(tasks, int(config.get("max_batch_size") or 1), constant)
        for series in tally.series():
            self._metric_handles[series] = self._metric_families[series.family.name].Metric(labels=series.label_dict)
        gauges, missing = serving_metrics.expected_gauges_in(folder, tasks, constant)
        for series, value in gauges:
            handle = self._metric_families[series.family.name].Metric(labels=series.label_dict)
            handle.set(value)
            self._metric_handles[series] = handle
        if missing:
            pb_utils.Logger.log_warn(f"mtl metrics: no gauge for {'; '.join(missing)}")
        self.metrics = tally
        self._flusher = serving_metrics.Flusher(
            tally,
            lambda series, delta: self._metric_handles[series].increment(delta),
            serving_metrics.flush_interval(os.environ),
            on_error=pb_utils.Logger.log_error,
        ).start()


def _error(message, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
