"""Serve every batching variant of a model from one Triton start and load-test each in turn."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .analyzer import PerfAnalyzer, RunSettings
from .load import LocalTarget, Workload, local_target, sweep
from .variants import Variant, build_repository


def run_variants(analyzer: PerfAnalyzer, repository: Path, model: str, variants: list[Variant], texts: list[str],
                 workloads: list[Workload], out_dir: Path, settings: RunSettings, *, stub_python: Path | None = None,
                 startup_timeout_s: float = 600.0, on_ready: Callable[[LocalTarget, dict[str, Variant]], None] | None = None,
                 log=print, errors: list[str] | None = None) -> list[dict]:
    """One row per variant, workload and concurrency: the variant's settings plus the measurement.

    With an `errors` list, a failed perf_analyzer run is recorded there and the sweep goes on.
    """
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mtl-sweep-") as tmp:
        served = build_repository(repository, model, variants, Path(tmp) / "repository")
        log(f"perf: serving {len(served)} variants of {model} from one Triton: {', '.join(served)}")
        started = time.monotonic()
        with local_target(Path(tmp) / "repository", next(iter(served)), out_dir / "tritonserver.log", stub_python,
                          startup_timeout_s) as target:
            log(f"perf: all variants ready after {time.monotonic() - started:.0f}s")
            if on_ready is not None:
                on_ready(target, served)
            for name, variant in served.items():
                target.model = name
                result = sweep(analyzer, target, texts, workloads, out_dir, settings, prefix=f"{variant.name}__", log=log,
                               keep_going=errors is not None)
                if errors is not None:
                    errors.extend(result.errors)
                rows.extend({**variant.describe(), **m.as_row()} for m in result.measurements)
    return rows
