"""One benchmark run: every contender on every workload, repetitions interleaved, on one machine.

The contenders are loaded first (the peers' graphs exported once, see peers.PeerFiles), then the server is
started when a product contender needs it; each repetition then runs every workload through every contender in
turn, so a change in the machine's load hits all of them alike. Figures are the median of the repetitions.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from ..machine import commit, machine, versions
from ..served import open_served, version_dir
from ..triton import cache_dir, server_pids
from . import peers as peer_module
from . import product, quality
from .measure import Timing, summarize, timed
from .workloads import Workload, calibration_texts, workloads, write_csv

SERVER_CONTENDERS = ("client", "cli", "perf")
TARGETS = {"client": 1.0, "cli": 0.9}  # product figure / fastest peer, on every workload
PAUSE_S = 1.0  # between two timed calls: lets the previous contender's spinning threads settle
DEFAULT_PERF_REQUESTS = ("64:1,2,4", "1:1,4,16")


def contender_help() -> dict[str, str]:
    return {**peer_module.PEERS, **product.PRODUCT}


def default_contenders(device: str) -> list[str]:
    return peer_module.default_peers(device) + ["core", "client", "cli"]


@dataclass
class Settings:
    repository: Path
    contenders: list[str]
    sentences: int = 2000
    workload_names: tuple[str, ...] = ("short", "long")
    repeats: int = 3
    threads: int = 2
    concurrency: int = 4
    device: str = "cpu"
    st_model: Path | None = None
    stub_python: Path | None = None
    perf_requests: tuple[str, ...] = DEFAULT_PERF_REQUESTS
    perf_out: Path | None = None
    stability: int = 50
    peer_cache: Path | None = None
    label: str = "cpu"
    command: str = ""


@dataclass
class Contender:
    name: str
    kind: str  # "peer" or "product"
    detail: str
    call: Callable[[Workload], object]
    uses_server: bool = False
    timings: dict[str, list[Timing]] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)  # first repetition's answers, per workload


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in contender_help()]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; known: {', '.join(contender_help())}")


def run_benchmark(settings: Settings, log=print) -> dict:
    import torch

    check_names(settings.contenders)
    torch.set_num_threads(settings.threads)
    started = time.monotonic()
    loads = workloads(settings.sentences, settings.workload_names)
    from mtl_build import pbtxt

    from ..perf import read_settings

    report = {
        "label": settings.label,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": settings.command,
        "commit": commit(),
        "machine": machine(),
        "versions": versions(),
        "device": settings.device,
        "threads": settings.threads,
        "repeats": settings.repeats,
        "concurrency": settings.concurrency,
        "model_repository": str(settings.repository),
        "model_config": read_settings(pbtxt.read_config(settings.repository / product.MODEL)),
        "workloads": {w.name: w.describe() for w in loads},
        "contenders": {},
        "results": {},
        "quality": {},
        "errors": [],
    }
    wanted = settings.contenders
    contenders: list[Contender] = []
    peer_names = [n for n in wanted if n in peer_module.PEERS]
    if peer_names:
        from mtl_build.backbone import default_backbone_path

        st_path = settings.st_model or default_backbone_path()
        loaded, made = peer_module.load_peers(
            peer_names,
            st_path,
            settings.device,
            settings.threads,
            calibration_texts(),
            settings.peer_cache or cache_dir(),
            log,
        )
        report["peer_files"] = {**made, "sentence_transformers_folder": str(st_path)}
        contenders += [Contender(p.name, "peer", p.detail, lambda w, p=p: p.encode(w.texts)) for p in loaded.values()]
    served_device = "gpu" if settings.device.startswith("cuda") else "cpu"
    if "core" in wanted:
        core = product.Core(settings.repository, settings.threads, served_device)
        contenders.append(Contender("core", "product", core.detail, lambda w: core.run(w.texts)))
    reference = open_served(
        version_dir(settings.repository),
        runtime="torch",
        precision="float32",
        device=served_device,
        threads=settings.threads,
    )
    for w in loads:
        report["workloads"][w.name]["mean_tokens"] = round(float(reference.encode(w.texts).lengths.mean()), 1)
    reference_labels = {}
    if {"core", "client"} & set(wanted):
        log("bench: the float32 torch reference labels")
        reference_labels = {
            w.name: product.labels_of(reference, reference.predict(w.texts).probabilities) for w in loads
        }
    with ExitStack() as stack:
        target = None
        if set(SERVER_CONTENDERS) & set(wanted):
            from ..perf import local_target

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mtl-bench-")))
            keep = "perf" in wanted and settings.perf_out is not None  # the server's log goes with perf's files
            log_file = (settings.perf_out if keep else tmp) / "tritonserver.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            target = stack.enter_context(
                local_target(settings.repository, product.MODEL, log_file, settings.stub_python)
            )
            target.check(loads[0].texts)
            report["server"] = {**target.describe(), "started_after_s": round(time.monotonic() - started, 1)}

            def pids():
                return server_pids(target.server)

            if "client" in wanted:
                client = stack.enter_context(closing(product.Client(target.grpc_url, settings.concurrency)))
                contenders.append(Contender("client", "product", client.detail, lambda w: client.run(w.texts), True))
            if "cli" in wanted:
                csvs = {w.name: write_csv(w.texts, tmp / f"{w.name}.csv") for w in loads}
                cli = product.Cli(target.grpc_url, settings.concurrency, csvs, tmp / "outputs")
                contenders.append(Contender("cli", "product", cli.detail, cli.run, True))
        report["contenders"] = {c.name: {"kind": c.kind, "detail": c.detail} for c in contenders}
        for contender in contenders:  # warm-up: first-call compilation and caches, on every workload's shapes
            for w in loads:
                attempt(report, f"{contender.name} warm-up", contender.call, _head(w))
        for repetition in range(settings.repeats):
            for w in loads:
                for contender in contenders:
                    time.sleep(PAUSE_S)
                    cpu_of = pids if contender.uses_server else list
                    outcome = attempt(
                        report, f"{contender.name} on {w.name}", timed, partial(contender.call, w), cpu_of
                    )
                    if outcome is None:
                        continue
                    output, timing = outcome
                    contender.timings.setdefault(w.name, []).append(timing)
                    contender.outputs.setdefault(w.name, output)
            log(f"bench: repetition {repetition + 1}/{settings.repeats} done after {time.monotonic() - started:.0f}s")
        if "perf" in wanted and target is not None:
            from ..perf import RunSettings

            perf_dir = settings.perf_out or tmp / "perf"
            run_settings = RunSettings(measurement_ms=2000, max_trials=6, stability_percent=settings.stability)
            result = attempt(
                report,
                "perf",
                lambda: product.run_perf_analyzer(
                    target, loads[-1].texts, perf_dir, list(settings.perf_requests), run_settings, log
                ),
            )
            if result:
                report["results"]["perf"] = result
                report["errors"] += [f"perf: {e}" for e in result["errors"]]
    for contender in contenders:
        report["results"][contender.name] = {
            name: summarize(ts, len(next(w for w in loads if w.name == name).texts))
            for name, ts in contender.timings.items()
        }
    report["quality"] = judge(contenders, reference_labels)
    report["ratios"] = ratios(report["results"], report["contenders"], list(report["workloads"]))
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _head(workload: Workload) -> Workload:
    return Workload(workload.name, workload.texts[: product.BATCH], workload.source)


def attempt(report: dict, what: str, function, *args):
    """Run one step; a failure is recorded in the report and the run goes on (it exits 1 at the end)."""
    try:
        return function(*args)
    except Exception as exc:  # the other contenders still run; the report names the failure
        report["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        return None


def judge(contenders: list[Contender], reference_labels: dict) -> dict:
    """Peers: cosine to sentence-transformers float32 per workload. Product: label agreement with torch float32."""
    out: dict[str, dict] = {}
    reference = next((c for c in contenders if c.name == peer_module.REFERENCE_PEER), None)
    for contender in contenders:
        for workload, output in contender.outputs.items():
            if contender.kind == "peer" and reference is not None and workload in reference.outputs:
                out.setdefault(contender.name, {})[workload] = quality.cosine(output, reference.outputs[workload])
            elif contender.name in ("core", "client") and workload in reference_labels:
                out.setdefault(contender.name, {})[workload] = quality.label_agreement(
                    output, reference_labels[workload]
                )
    return out


def ratios(results: dict, contenders: dict, workload_names: list[str]) -> dict:
    """Per workload: the fastest peer, and each product figure over it (and whether it meets its target)."""
    out = {}
    for workload in workload_names:
        peer_rates = {
            name: entry[workload]["sentences_per_s"]
            for name, entry in results.items()
            if contenders.get(name, {}).get("kind") == "peer" and workload in entry
        }
        if not peer_rates:
            continue
        fastest = max(peer_rates, key=peer_rates.get)
        row = {"fastest_peer": fastest, "fastest_peer_sentences_per_s": peer_rates[fastest], "products": {}}
        for name, entry in results.items():
            if contenders.get(name, {}).get("kind") == "product" and workload in entry:
                ratio = round(entry[workload]["sentences_per_s"] / peer_rates[fastest], 3)
                target = TARGETS.get(name)
                row["products"][name] = {
                    "ratio": ratio,
                    "target": target,
                    "met": None if target is None else ratio >= target,
                }
        out[workload] = row
    return out
