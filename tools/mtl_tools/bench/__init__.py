"""The product against the in-process peers a user could run instead, in one run (`python -m mtl_tools.bench`).

Modules: `workloads` (the fixed sentence sets), `peers` (sentence-transformers float32/bfloat16, ONNX Runtime
dynamic int8, OpenVINO static int8, from the same local encoder files), `product` (the served core, the client
and the CLI through the real Triton, perf_analyzer), `measure` (timing and CPU), `quality` (cosine, label
agreement), `run` (the interleaved repetitions, the ratios), `report` (JSON, markdown, the docs section),
`client_rss` (the CLI's peak memory).
"""

from .report import markdown, update_doc, write_results
from .run import Settings, contender_help, default_contenders, run_benchmark
from .workloads import Workload, calibration_texts, data_texts, workloads, write_csv

__all__ = [
    "Settings",
    "Workload",
    "calibration_texts",
    "contender_help",
    "data_texts",
    "default_contenders",
    "markdown",
    "run_benchmark",
    "update_doc",
    "workloads",
    "write_csv",
    "write_results",
]
