"""What model.py's mtl_* metrics cost per request: measured with and without them, in the same run.

    .venv/bin/python -m mtl_tools.bench.metrics_overhead --repository model_repository [--out result.json]

1. In process: the served model (multitask_core.ServedModel) runs execute-sized batches; each batch is timed
   with record_batch (what execute adds) and without it, alternately; record_batch alone is timed too, and so
   is the flusher's drain, which buckets all the queued executes at once.
2. The real server: two Tritons (mtl_serve.LocalTriton) at once, MTL_METRICS=on and =off, sent the same
   request in turn, then two with metrics off as a control (the noise floor of a paired comparison). At stop
   model.py logs how many metric updates its flusher sent and what they cost (each one is an IPC round trip
   to the Triton process, off the request path but holding the stub's GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SENTENCES = [
    "The central bank raised interest rates again to fight inflation",
    "This new phone's battery dies before lunch, what a waste of money",
    "The film's soundtrack is gorgeous and the cast is wonderful",
    "Shares of the chipmaker fell sharply after weak quarterly results",
    "The update finally fixed the crash in the photo app",
    "Tickets for the band's reunion tour sold out in minutes",
    "Is the meeting about the merger still on for Tuesday?",
    "My laptop keeps overheating whenever I open a browser",
]
FLUSHER_LOG = re.compile(r"mtl metrics: (\d+) flushes, (\d+) metric updates, ([\d.]+) ms sending")


def texts(rows: int, offset: int = 0) -> list[str]:
    return [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(rows)]


def in_process(version: Path, sizes: list[int], rounds: int) -> list[dict]:
    from mtl_build.pbtxt import read_config
    from multitask_core.metrics import ServingMetrics
    from multitask_core.served import ServedModel

    config = read_config(version.parent / "config.pbtxt")
    served = ServedModel.open(version, config)
    tasks = [(task.name, task.labels) for task in served.spec.tasks]
    tally = ServingMetrics(tasks, int(config.get("max_batch_size") or 1), {"model": "bench", "version": "1"})
    results = []
    for rows in sizes:
        batch_texts = texts(rows)
        served.run(served.encode(batch_texts))  # warm-up
        timings = {"with": [], "without": [], "counting": []}
        for index in range(2 * rounds):
            started = time.perf_counter()
            batch = served.encode(batch_texts)
            probabilities = served.run(batch)
            ran = time.perf_counter()
            if index % 2 == 0:
                tally.record_batch(probabilities, batch.truncated, [rows])
                counted = time.perf_counter()
                timings["counting"].append(counted - ran)
                timings["with"].append(counted - started)
            else:
                timings["without"].append(ran - started)
        drain_started = time.perf_counter()
        drained = tally.drain()  # the flusher's share: bucketing every execute queued since the last flush
        drain_s = time.perf_counter() - drain_started
        median = {key: statistics.median(values) for key, values in timings.items()}
        results.append(
            {
                "rows_per_execute": rows,
                "executes": rounds,
                "median_ms_with": round(median["with"] * 1e3, 3),
                "median_ms_without": round(median["without"] * 1e3, 3),
                "ratio_with_to_without": round(median["with"] / median["without"], 4),
                "median_record_us": round(median["counting"] * 1e6, 1),
                "record_share_of_execute": round(median["counting"] / median["without"], 5),
                "drain_ms_for_all_executes": round(drain_s * 1e3, 3),
                "series_changed": len(drained),
            }
        )
        print(f"in-process, {rows:>3} rows/execute: {results[-1]}", flush=True)
    return results


def start_server(repository: Path, metrics_on: bool, log_file: Path):
    from mtl_serve import LocalTriton
    from multitask_core.metrics import ENV_SWITCH

    os.environ[ENV_SWITCH] = "on" if metrics_on else "off"
    try:
        # No watchdog: its canary inferences would be extra traffic in one arm or the other.
        return LocalTriton(
            repository, grpc_port=0, http_port=0, metrics_port=0, watchdog=False, log_file=log_file
        ).start()
    finally:
        os.environ.pop(ENV_SWITCH, None)


def paired(
    repository: Path, sizes: list[int], requests: int, arms: tuple[tuple[str, bool], tuple[str, bool]]
) -> list[dict]:
    """Two servers at once (`arms`: (name, metrics on)), sent the same request in turn: load on the shared
    machine hits both alike, and each pair of latencies is one sample of the ratio first / second."""
    import tritonclient.grpc as grpcclient

    model = next(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    (first, _), (second, _) = arms
    results = []
    with tempfile.TemporaryDirectory(prefix="mtl-metrics-bench-") as folder:
        servers = {name: start_server(repository, on, Path(folder) / f"triton-{name}.log") for name, on in arms}
        try:
            clients = {name: grpcclient.InferenceServerClient(server.grpc_url) for name, server in servers.items()}
            for rows in sizes:
                tensor = grpcclient.InferInput("TEXT", [rows, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([t.encode() for t in texts(rows)], dtype=object).reshape(-1, 1))
                for client in clients.values():
                    for _ in range(5):
                        client.infer(model, [tensor])  # warm-up
                latency = {first: [], second: []}
                for index in range(requests):
                    for name in (first, second) if index % 2 == 0 else (second, first):
                        sent = time.perf_counter()
                        clients[name].infer(model, [tensor])
                        latency[name].append(time.perf_counter() - sent)
                ratios = [a / b for a, b in zip(latency[first], latency[second], strict=True)]
                results.append(
                    {
                        "pair": f"{first}/{second}",
                        "rows_per_request": rows,
                        "requests_per_arm": requests,
                        f"p50_ms_{first}": round(statistics.median(latency[first]) * 1e3, 3),
                        f"p50_ms_{second}": round(statistics.median(latency[second]) * 1e3, 3),
                        "median_paired_ratio": round(statistics.median(ratios), 4),
                        "mean_latency_ratio": round(
                            statistics.fmean(latency[first]) / statistics.fmean(latency[second]), 4
                        ),
                    }
                )
                print(f"server {first}/{second}, {rows:>3} rows/request: {results[-1]}", flush=True)
            for client in clients.values():
                client.close()
        finally:
            for server in servers.values():
                server.stop()
        for name, on in arms:
            log = servers[name].log_text()
            if not on:
                assert "mtl metrics off" in log, f"server {name} did not turn its metrics off"
                continue
            flusher = FLUSHER_LOG.findall(log)
            updates, send_ms = sum(int(f[1]) for f in flusher), sum(float(f[2]) for f in flusher)
            results.append(
                {
                    "flusher_of": name,
                    "instances": len(flusher),
                    "flushes": sum(int(f[0]) for f in flusher),
                    "updates": updates,
                    "ms_sending": round(send_ms, 1),
                    "us_per_update": round(send_ms * 1e3 / updates, 1) if updates else None,
                }
            )
            print(f"server flusher: {results[-1]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="multitask")
    parser.add_argument("--rows", default="1,8,64", help="rows per execute / request, comma-separated")
    parser.add_argument("--rounds", type=int, default=40, help="in-process executes per arm and size")
    parser.add_argument("--server-rows", default="1,8", help="rows per request in the server runs")
    parser.add_argument("--requests", type=int, default=200, help="requests per arm and size in the server run")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--no-control", action="store_true", help="skip the off/off pair that shows the noise floor")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.rows.split(",")]
    version = args.repository / args.model / "1"
    if not (version / "manifest.json").is_file():
        print(f"no built model at {version}: run mtl-build first", file=sys.stderr)
        return 2
    result = {"in_process": in_process(version, sizes, args.rounds)}
    if not args.skip_server:
        server_sizes = [int(size) for size in args.server_rows.split(",")]
        repository = args.repository.resolve()
        result["server"] = paired(repository, server_sizes, args.requests, (("on", True), ("off", False)))
        if not args.no_control:  # two identical servers: how far apart two arms are with no difference at all
            result["server_control"] = paired(
                repository, server_sizes, args.requests, (("off_a", False), ("off_b", False))
            )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
