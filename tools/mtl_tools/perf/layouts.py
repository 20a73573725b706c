"""Serve the variants of a model's serving layout from one Triton start (or a few, --per-server) and load-test each."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .analyzer import PerfAnalyzer, RunSettings
from .load import LocalTarget, Workload, local_target, sweep
from .variants import Variant, build_repository, threads_check


def groups_of(variants: list[Variant], per_server: int | None) -> list[list[Variant]]:
    """Variants split into the groups served by one Triton start each (all in one when per_server is None)."""
    size = per_server or len(variants) or 1
    return [variants[i : i + size] for i in range(0, len(variants), size)]


def run_variants(
    analyzer: PerfAnalyzer,
    repository: Path,
    model: str,
    variants: list[Variant],
    texts: list[str],
    workloads: list[Workload],
    out_dir: Path,
    settings: RunSettings,
    *,
    stub_python: Path | None = None,
    startup_timeout_s: float = 600.0,
    per_server: int | None = None,
    on_ready: Callable[[LocalTarget, dict[str, Variant]], None] | None = None,
    log=print,
    errors: list[str] | None = None,
    notes: list[str] | None = None,
) -> list[dict]:
    """One row per variant, workload and concurrency: the variant's settings plus the measurement.

    With an `errors` list, a failed perf_analyzer run is recorded there and the sweep goes on. `notes` gets what
    the check of the logged thread counts found (see variants.threads_check). `on_ready` runs once, on the first
    server, before any load.
    """
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = groups_of(variants, per_server)
    for number, group in enumerate(groups, 1):
        suffix = f"-{number}" if len(groups) > 1 else ""
        with tempfile.TemporaryDirectory(prefix="mtl-sweep-") as tmp:
            served = build_repository(repository, model, group, Path(tmp) / "repository")
            log(f"perf: serving {len(served)} variants of {model} from one Triton: {', '.join(served)}")
            started = time.monotonic()
            log_file = out_dir / f"tritonserver{suffix}.log"
            with local_target(
                Path(tmp) / "repository", next(iter(served)), log_file, stub_python, startup_timeout_s
            ) as target:
                log(f"perf: all variants ready after {time.monotonic() - started:.0f}s")
                problem = threads_check(target.server.log_text(), group, os.cpu_count() or 1)
                if problem and notes is not None:
                    notes.append(f"server {number}: {problem}")
                if problem:
                    log(f"perf: {problem}")
                if on_ready is not None and number == 1:
                    on_ready(target, served)
                for name, variant in served.items():
                    target.model = name
                    result = sweep(
                        analyzer,
                        target,
                        texts,
                        workloads,
                        out_dir,
                        settings,
                        prefix=f"{variant.name}__",
                        log=log,
                        keep_going=errors is not None,
                    )
                    if errors is not None:
                        errors.extend(result.errors)
                    rows.extend({**variant.describe(), **m.as_row()} for m in result.measurements)
    return rows
