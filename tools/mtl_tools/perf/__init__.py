"""Load tests of the served model with the real perf_analyzer over gRPC, and the sweep of serving layouts.

`python -m mtl_tools.perf run INPUT.csv --model-repository model_repository` turns a CSV of sentences into
perf_analyzer input data, starts the local Triton (or checks a running one with --url), sweeps concurrency for
1-sentence and 64-sentence requests, and writes perf_analyzer's CSVs, a combined CSV and a PNG of throughput
against p99 latency. `python -m mtl_tools.perf sweep` does the same for variants of the model's serving layout
(instances x threads per instance x tokens per forward x queue delay x preferred batch sizes).

Public functions: `PerfAnalyzer.locate`, `RunSettings`, `Workload`, `local_target`, `RemoteTarget`, `sweep`
(one concurrency sweep), `run_variants` (the layout sweep), `grid`/`Variant`/`apply` (variants through the
schema), `metadata`/`write_run`/`write_sweep` (the reports).
"""

from .analyzer import PERF_ANALYZER_VERSION, Measurement, PerfAnalyzer, PerfError, RunSettings
from .layouts import run_variants
from .load import SMOKE_TEXTS, LocalTarget, RemoteTarget, Target, Workload, local_target, sweep
from .report import metadata, write_run, write_sweep
from .variants import Variant, VariantError, apply, grid, parse_preferred, read_settings, threads_check

__all__ = [
    "PERF_ANALYZER_VERSION",
    "LocalTarget",
    "Measurement",
    "PerfAnalyzer",
    "PerfError",
    "RemoteTarget",
    "RunSettings",
    "SMOKE_TEXTS",
    "Target",
    "Variant",
    "VariantError",
    "Workload",
    "apply",
    "grid",
    "local_target",
    "metadata",
    "parse_preferred",
    "read_settings",
    "run_variants",
    "sweep",
    "threads_check",
    "write_run",
    "write_sweep",
]
