"""The product's contenders: the served core in-process, `MultiTaskClient.predict` and `mtl-client predict`
through the real Triton, and perf_analyzer against the same server.

Everything that opens the served model goes through `multitask_core.served.ServedModel` with the config that
mtl_build.pbtxt reads back from config.pbtxt; nothing here tokenizes or loads weights itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from ..served import MODEL, open_served, version_dir

BATCH = 64  # sentences per request, as the peers' batch size

PRODUCT = {
    "core": "the served core in-process: ServedModel.predict(texts, batch_size=64) with the repository's runtime, "
    "one instance on all the threads (no server)",
    "client": "MultiTaskClient.predict(texts, batch_size=64) through the real Triton (the repository's serving: "
    "runtime, instances), --concurrency requests in flight",
    "cli": "`mtl-client predict` on a CSV of the texts through the same server: the whole process (start-up, "
    "reading, writing the per-task files), wall time",
    "perf": "perf_analyzer 2.50 over gRPC against the same server (--perf-requests); figures, not a ratio",
}


def labels_of(served, probabilities: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {task.name: [task.labels[i] for i in probabilities[task.name].argmax(axis=1)] for task in served.spec.tasks}


class Core:
    def __init__(self, repository: Path, threads: int, device: str):
        self.served = open_served(version_dir(repository), threads=threads, device=device)
        self.detail = self.served.describe()

    def run(self, texts: list[str]) -> dict[str, list[str]]:
        return labels_of(self.served, self.served.predict(texts, batch_size=BATCH).probabilities)


class Client:
    def __init__(self, url: str, concurrency: int, model: str = MODEL):
        from mtl_client import MultiTaskClient

        self.client = MultiTaskClient(url, model, concurrency=concurrency)
        self.detail = f"{url}, batch {BATCH}, {concurrency} in flight"

    def run(self, texts: list[str]) -> dict[str, list[str]]:
        predictions = self.client.predict(texts, batch_size=BATCH)
        if len(predictions) != len(texts):
            raise RuntimeError(
                f"MultiTaskClient.predict returned {len(predictions)} predictions for {len(texts)} texts"
            )
        return {task: [p[task].label for p in predictions] for task in predictions[0].tasks} if predictions else {}

    def close(self) -> None:
        self.client.close()


def cli_command() -> list[str]:
    """The console script beside this Python where mtl-client is installed; its module where it is only on
    PYTHONPATH (the GPU check)."""
    script = Path(sys.executable).with_name("mtl-client")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mtl_client.cli"]


class Cli:
    def __init__(self, url: str, concurrency: int, csv_paths: dict[str, Path], out_dir: Path, model: str = MODEL):
        self.url, self.concurrency, self.csv_paths, self.out_dir, self.model = (
            url,
            concurrency,
            csv_paths,
            out_dir,
            model,
        )
        self.detail = f"{' '.join(cli_command())} predict CSV --batch-size {BATCH} --concurrency {concurrency}"

    def run(self, workload) -> None:
        command = cli_command() + [
            "predict",
            str(self.csv_paths[workload.name]),
            "--url",
            self.url,
            "--model",
            self.model,
            "--out-dir",
            str(self.out_dir),
            "--batch-size",
            str(BATCH),
            "--concurrency",
            str(self.concurrency),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")


def run_perf_analyzer(target, texts: list[str], out_dir: Path, workloads: list[str], settings, log) -> dict:
    """perf_analyzer's concurrency sweep against the running server; its files in out_dir; the best per size."""
    from ..perf import PerfAnalyzer, Workload, metadata, sweep, write_run

    analyzer = PerfAnalyzer.locate()
    result = sweep(
        analyzer, target, texts, [Workload.parse(w) for w in workloads], out_dir, settings, log=log, keep_going=True
    )
    if not result.measurements:
        raise RuntimeError("no perf_analyzer run succeeded: " + "; ".join(result.errors))
    write_run(
        result.measurements,
        out_dir,
        {**metadata(analyzer, settings, texts, "benchmark sentences"), "target": target.describe()},
        target.model,
    )
    rows = [m.as_row() for m in result.measurements]
    best = {}
    for size in sorted({r["sentences_per_request"] for r in rows}):
        top = max((r for r in rows if r["sentences_per_request"] == size), key=lambda r: r["sentences_per_s"])
        best[str(size)] = {
            "concurrency": top["concurrency"],
            "sentences_per_s": round(top["sentences_per_s"], 1),
            "requests_per_s": round(top["requests_per_s"], 1),
            "p50_ms": round(top["p50_us"] / 1000, 1),
            "p99_ms": round(top["p99_us"] / 1000, 1),
        }
    return {"perf_analyzer": analyzer.version(), "rows": rows, "best": best, "errors": result.errors}
