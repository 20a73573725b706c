"""`python -m mtl_tools.perf`: load-test the served model with perf_analyzer (run), or sweep serving layouts."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from mtl_build import pbtxt

from ..paths import RESULTS
from . import analyzer as pa
from .inputs import InputError, read_sentences
from .layouts import run_variants
from .load import RemoteTarget, Workload, local_target, sweep
from .report import metadata, write_run, write_sweep
from .variants import VariantError, grid, parse_preferred, read_settings

DEFAULT_WORKLOADS = ("1:1,2,4", "64:1,2")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _workloads(_ctx, _param, values) -> list[Workload]:
    try:
        return [Workload.parse(v) for v in (values or DEFAULT_WORKLOADS)]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _int_list(_ctx, param, value: str) -> list[int]:
    """'1,2' → [1, 2]; 'auto' stands for 0 (the served core's default) where a setting has one."""
    try:
        numbers = [0 if v.strip() == "auto" else int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None
    if not numbers or min(numbers) < 0:
        raise click.BadParameter(f"{value!r}: expected non-negative integers")
    return numbers


def _common(function):
    options = [
        click.argument("input_csv", type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        click.option(
            "--text-column", default="text", show_default=True, help="Column of INPUT_CSV holding the sentences."
        ),
        click.option(
            "--max-sentences",
            type=click.IntRange(1),
            default=1024,
            show_default=True,
            help="Sentences put into perf_analyzer's input data (it holds them per thread).",
        ),
        click.option(
            "--requests",
            "workloads",
            multiple=True,
            callback=_workloads,
            metavar="SENTENCES:C1,C2,...",
            help="Requests of SENTENCES sentences at each concurrency; repeatable. "
            f"Default: {' and '.join(DEFAULT_WORKLOADS)} (a small CPU sweep; e.g. "
            "--requests 1:16,64,256 --requests 64:4,8,16,32 on a GPU).",
        ),
        click.option(
            "--measurement-ms",
            type=click.IntRange(100),
            default=2000,
            show_default=True,
            help="perf_analyzer --measurement-interval.",
        ),
        click.option(
            "--max-trials",
            type=click.IntRange(3),
            default=6,
            show_default=True,
            help="perf_analyzer --max-trials: windows tried before giving up on a stable measurement.",
        ),
        click.option(
            "--stability",
            type=click.IntRange(1, 1000),
            default=50,
            show_default=True,
            help="perf_analyzer --stability-percentage: the last 3 windows' max/min throughput and "
            "latency must be within it (a busy shared CPU may need 100 or more).",
        ),
        click.option(
            "--run-timeout",
            type=click.FloatRange(1),
            default=180.0,
            show_default=True,
            help="Seconds before one perf_analyzer run is killed and reported as failed.",
        ),
        click.option(
            "--perf-analyzer",
            "perf_analyzer",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            default=None,
            help="perf_analyzer binary (default: $MTL_PERF_ANALYZER, else the 2.50 binary "
            "extracted from the tritonclient 2.50.0 wheel into the cache).",
        ),
        click.option(
            "--model", default="multitask", show_default=True, help="Model name in the repository / on the server."
        ),
        click.option(
            "--stub-python",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            default=None,
            help="python3 of the model's environment (numpy<2, torch, tokenizers) for a server this tool starts.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _settings(measurement_ms, max_trials, stability, run_timeout) -> pa.RunSettings:
    return pa.RunSettings(
        measurement_ms=measurement_ms, max_trials=max_trials, stability_percent=stability, timeout_s=run_timeout
    )


def _sentences(input_csv: Path, text_column: str, max_sentences: int) -> list[str]:
    try:
        sentences = read_sentences(input_csv, text_column, limit=max_sentences)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="INPUT_CSV") from None
    if sentences.skipped_empty:
        click.echo(f"perf: skipped {sentences.skipped_empty} empty row(s) of {input_csv}", err=True)
    return sentences.texts


def _fail(exc: Exception) -> None:
    click.echo(f"perf: error: {exc}", err=True)
    sys.exit(1)


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Load tests of the multitask model with the real perf_analyzer over gRPC."""


@main.command()
@click.option(
    "--wheel",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A downloaded tritonclient-2.50.0 wheel (default: pip download it).",
)
def install(wheel: Path | None) -> None:
    """Extract perf_analyzer 2.50 from the tritonclient 2.50.0 wheel into the mtl-triton cache."""
    try:
        binary = pa.install(wheel)
    except pa.PerfError as exc:
        _fail(exc)
    click.echo(binary)


@main.command("run")
@_common
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Start the local Triton on this repository for the run (free ports; stopped afterwards).",
)
@click.option("--url", default=None, help="gRPC HOST:PORT of a running server instead (its model must be READY).")
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("perf_results"),
    show_default=True,
    help="Folder for perf_analyzer's CSVs, perf.csv, perf.png, summary.json and logs/.",
)
def run_command(
    input_csv,
    text_column,
    max_sentences,
    workloads,
    measurement_ms,
    max_trials,
    stability,
    run_timeout,
    perf_analyzer,
    stub_python,
    model,
    model_repository,
    url,
    out_dir,
) -> None:
    """Concurrency sweep of INPUT_CSV's sentences against the model; CSVs and a PNG into --out-dir.

    Writes perf_analyzer's own CSV for each run (pa_b<SENTENCES>_c<CONCURRENCY>.csv), perf.csv (all runs),
    perf.png (throughput against p99 latency), summary.json, and perf_analyzer's output under logs/.
    Exits 1 when perf_analyzer reports an error, a measurement is unusable, or the model stops answering.
    """
    if bool(model_repository) == bool(url):
        raise click.UsageError("give exactly one of --model-repository (start a server) or --url (use a running one)")
    texts = _sentences(input_csv, text_column, max_sentences)
    settings = _settings(measurement_ms, max_trials, stability, run_timeout)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        analyzer = pa.PerfAnalyzer.locate(perf_analyzer)
        meta = metadata(analyzer, settings, texts, str(input_csv))
        if model_repository:
            meta["model_config"] = read_settings(pbtxt.read_config(model_repository / model))
            context = local_target(model_repository, model, out_dir / "tritonserver.log", stub_python)
        else:
            context = nullcontext(RemoteTarget(url, model))
        with context as target:
            meta["target"] = target.describe()
            result = sweep(analyzer, target, texts, workloads, out_dir, settings, log=lambda m: click.echo(m, err=True))
    except (pa.PerfError, OSError) as exc:
        _fail(exc)
    write_run(result.measurements, out_dir, meta, model)
    click.echo(
        f"wrote {out_dir}/perf.csv, {out_dir}/perf.png, {out_dir}/summary.json and "
        f"{len(result.raw_csvs)} perf_analyzer CSVs",
        err=True,
    )


@main.command("sweep")
@_common
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="Built model repository whose model is the base of every variant.",
)
@click.option("--instances", default="1,2", show_default=True, callback=_int_list, help="Instance counts to try.")
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    callback=_int_list,
    help="Threads per instance to try (parameter 'threads'); auto = the served core's default, "
    "cores // instances. The run checks the thread counts the instances log.",
)
@click.option(
    "--tokens-per-forward",
    "tokens",
    default="auto",
    show_default=True,
    callback=_int_list,
    help="Padded tokens per forward to try (parameter tokens_per_forward); auto = the device default.",
)
@click.option(
    "--queue-delays",
    default="0,2000",
    show_default=True,
    callback=_int_list,
    help="max_queue_delay_microseconds values to try.",
)
@click.option(
    "--preferred",
    multiple=True,
    metavar="SIZES|none",
    help="Preferred batch sizes to try, e.g. 64,128,256 or none; repeatable. Default: the base config's.",
)
@click.option("--name", default=None, help="Keep the results in benchmarks/results/sweep-NAME/ (instead of --out-dir).")
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("perf_results/sweep"),
    show_default=True,
    help="Folder for the results when no --name is given.",
)
@click.option(
    "--per-server",
    type=click.IntRange(1),
    default=None,
    help="Variants served by one Triton start (default: all; fewer bound the memory of a large sweep).",
)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(10),
    default=600.0,
    show_default=True,
    help="Seconds to wait for every variant to load.",
)
def sweep_command(
    input_csv,
    text_column,
    max_sentences,
    workloads,
    measurement_ms,
    max_trials,
    stability,
    run_timeout,
    perf_analyzer,
    model,
    stub_python,
    model_repository,
    instances,
    threads,
    tokens,
    queue_delays,
    preferred,
    name,
    out_dir,
    per_server,
    startup_timeout,
) -> None:
    """Serve every combination of --instances x --threads x --tokens-per-forward x --queue-delays x --preferred
    and load-test each.

    Each variant is the base config.pbtxt read through Triton's schema, edited and written back under its own
    model name. Writes sweep.csv (one row per variant, workload and concurrency), sweep.md (a table, with the
    machine and the commit), one PNG per workload (sweep_b<SENTENCES>.png), summary.json and every perf_analyzer
    CSV. The base model's own config is unchanged.
    """
    if min(instances) < 1:
        raise click.BadParameter("instance counts must be >= 1", param_hint="--instances")
    try:
        base_config = pbtxt.read_config(model_repository / model)
    except pbtxt.ModelConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--model-repository") from None
    base_settings = read_settings(base_config)
    try:
        preferred_sets = (
            [parse_preferred(p) for p in preferred]
            if preferred
            else [parse_preferred(base_settings["preferred_batch_sizes"].replace(" ", ","))]
        )
    except VariantError as exc:
        raise click.BadParameter(str(exc), param_hint="--preferred") from None
    if name:
        out_dir = RESULTS / f"sweep-{name}"
    texts = _sentences(input_csv, text_column, max_sentences)
    settings = _settings(measurement_ms, max_trials, stability, run_timeout)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = grid(instances, queue_delays, preferred_sets, threads, tokens)
    errors: list[str] = []  # a run that fails (e.g. no stable window) is reported; the other variants still run
    notes: list[str] = []
    try:
        analyzer = pa.PerfAnalyzer.locate(perf_analyzer)
        meta = metadata(analyzer, settings, texts, str(input_csv))
        rows = run_variants(
            analyzer,
            model_repository,
            model,
            variants,
            texts,
            workloads,
            out_dir,
            settings,
            stub_python=stub_python,
            startup_timeout_s=startup_timeout,
            per_server=per_server,
            log=lambda m: click.echo(m, err=True),
            errors=errors,
            notes=notes,
        )
    except (pa.PerfError, VariantError, OSError) as exc:
        _fail(exc)
    if not rows:
        _fail(pa.PerfError("no perf_analyzer run succeeded: " + "; ".join(errors)))
    click.echo(write_sweep(rows, out_dir, meta, base_settings, model, errors, notes))
    click.echo(f"perf: results in {out_dir}", err=True)
    if errors:
        click.echo(f"perf: {len(errors)} run(s) failed; listed in {out_dir}/sweep.md", err=True)
        sys.exit(1)
