"""The load-testing tool: input data layout, checks on perf_analyzer's output, serving-layout variants through
Triton's schema, and real runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_build import pbtxt
from mtl_build.export import render_model_config
from mtl_tools.perf.analyzer import PerfError, check_output, parse_csv
from mtl_tools.perf.inputs import InputError, input_data, read_sentences
from mtl_tools.perf.load import Workload, _probabilities_ok
from mtl_tools.perf.variants import (
    Variant,
    VariantError,
    apply,
    build_repository,
    grid,
    parse_preferred,
    read_settings,
    threads_check,
)

ROOT = Path(__file__).resolve().parents[2]
# What perf_analyzer 2.50 writes with -f (one row per concurrency; latencies in µs).
PA_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "4,136.5,12,400,2000,40,9000,300,4,28000,35000,39000,52000\n"
    "1,84.7,7,300,2106,28,9068,285,4,11066,15165,16695,19542\n"
)


@pytest.fixture
def base_config(test_config) -> dict:
    """The model config mtl-build writes for the tests' project, as read back through the schema."""
    return pbtxt.from_text(pbtxt.to_text(render_model_config(test_config)))


def test_input_data_gives_each_sentence_shape_1(tmp_path):
    data = input_data(["first sentence", "zweiter Satz, mit Komma €"])
    assert data == {
        "data": [
            {"TEXT": {"content": ["first sentence"], "shape": [1]}},
            {"TEXT": {"content": ["zweiter Satz, mit Komma €"], "shape": [1]}},
        ]
    }


def test_read_sentences_skips_empty_rows_and_names_a_missing_column(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,"Shares rose, then fell."\n2,   \n3,Great film\n', encoding="utf-8")
    sentences = read_sentences(path)
    assert sentences.texts == ["Shares rose, then fell.", "Great film"] and sentences.skipped_empty == 1
    assert read_sentences(path, limit=1).texts == ["Shares rose, then fell."]
    with pytest.raises(InputError, match="no column 'body'"):
        read_sentences(path, text_column="body")
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n \n")
    with pytest.raises(InputError, match="no non-empty text"):
        read_sentences(empty)


def test_workload_spec():
    assert Workload.parse("64:1,2,4") == Workload(64, (1, 2, 4))
    for bad in ("64", "x:1", "64:", "0:1", "1:0"):
        with pytest.raises(ValueError):
            Workload.parse(bad)


def test_parse_csv_sorts_by_concurrency_and_counts_sentences(tmp_path):
    path = tmp_path / "pa.csv"
    path.write_text(PA_CSV)
    rows = parse_csv(path, sentences_per_request=64)
    assert [r.concurrency for r in rows] == [1, 4]
    assert rows[1].sentences_per_s == 136.5 and rows[1].requests_per_s == pytest.approx(136.5 / 64)
    assert rows[0].p99_us == 19542 and rows[0].server_compute_infer_us == 9068
    path.write_text("Concurrency,Something\n1,2\n")
    with pytest.raises(PerfError, match="not a perf_analyzer CSV"):
        parse_csv(path, 1)


@pytest.mark.parametrize(
    "output,code",
    [
        ("Request concurrency: 4\n  Thread [0] had error: [StatusCode.INTERNAL] Stub process is not healthy\n", 0),
        ("Failed to obtain stable measurement within 6 measurement windows for concurrency 1.\n", 2),
        ("error: failed to create concurrency manager: input data must be ...\n", 1),
        ("all fine\n", 99),
    ],
)
def test_check_output_fails_loudly(output, code):
    with pytest.raises(PerfError) as error:
        check_output(output, code, ["perf_analyzer", "-m", "multitask"])
    assert f"exit code {code}" in str(error.value)


def test_check_output_accepts_a_clean_run():
    check_output("Request concurrency: 1\n  Client:\n    Request count: 56\n    Throughput: 7.7 infer/sec\n", 0, ["pa"])


def test_smoke_answer_check():
    assert _probabilities_ok({"topic": [0.2, 0.3, 0.5], "TRUNCATED": [False]}, 1) is None
    assert "sums to" in _probabilities_ok({"topic": [0.2, 0.3, 0.4]}, 1)
    assert "no task outputs" in _probabilities_ok({"TRUNCATED": [False]}, 1)


def test_variant_edits_only_its_settings_through_the_schema(base_config):
    variant = Variant(
        instance_count=4, max_queue_delay_us=500, preferred_batch_sizes=(32, 64), threads=3, tokens_per_forward=2048
    )
    config = apply(base_config, variant, "multitask__" + variant.name)
    assert read_settings(config) == {
        **read_settings(base_config),
        "instance_count": 4,
        "max_queue_delay_us": 500,
        "preferred_batch_sizes": "32 64",
        "threads": 3,
        "tokens_per_forward": 2048,
    }
    assert config["name"] == "multitask__i4_t3_k2048_d500_p32-64"
    # Everything else is the build's: the edited keys are these, and only these parameters changed.
    edited = {"name", "dynamic_batching", "instance_group", "parameters"}
    assert set(config) == set(base_config)
    assert {k for k in config if config[k] != base_config[k]} == edited
    parameters, base_parameters = config["parameters"], base_config["parameters"]
    assert {k for k in parameters if parameters[k] != base_parameters.get(k)} == {"tokens_per_forward", "threads"}
    # What the variant wrote is what Triton's schema reads back.
    assert pbtxt.from_text(pbtxt.to_text(config)) == config
    assert base_config["instance_group"][0]["count"] != 4  # the base dict is not edited in place


def test_auto_threads_and_no_preferred_sizes_leave_the_defaults(base_config):
    with_threads = apply(base_config, Variant(1, 0, (), threads=2), "m")
    config = apply(with_threads, Variant(1, 0, ()), "m")
    assert "threads" not in config["parameters"] and "preferred_batch_size" not in config["dynamic_batching"]
    settings = read_settings(config)
    assert settings["preferred_batch_sizes"] == "none" and settings["threads"] == "auto"
    assert settings["tokens_per_forward"] == "auto"


def test_grid_covers_every_combination_in_a_fixed_order():
    variants = grid([1, 2], [0, 2000], [(64,)], threads=[0, 1], tokens=[0, 512])
    assert len(variants) == 16 and len({v.name for v in variants}) == 16
    assert variants[0].name == "i1_tauto_kauto_d0_p64" and variants[-1].name == "i2_t1_k512_d2000_p64"


def test_variant_errors_are_precise(base_config):
    with pytest.raises(VariantError, match="exceed max_batch_size"):
        apply(base_config, Variant(1, 0, (base_config["max_batch_size"] + 1,)), "m")
    no_batching = {k: v for k, v in base_config.items() if k != "dynamic_batching"}
    with pytest.raises(VariantError, match="dynamic_batching"):
        apply(no_batching, Variant(1, 0, ()), "m")
    two_groups = {**base_config, "instance_group": base_config["instance_group"] * 2}
    with pytest.raises(VariantError, match="2 instance groups"):
        apply(two_groups, Variant(1, 0, ()), "m")
    with pytest.raises(VariantError, match="instance count must be >= 1"):
        apply(base_config, Variant(0, 0, ()), "m")
    assert parse_preferred("64, 128") == (64, 128) and parse_preferred("none") == ()
    with pytest.raises(VariantError):
        parse_preferred("64,x")


def test_variant_repository_shares_the_built_version_folder(base_config, tmp_path):
    source = tmp_path / "source"
    (source / "multitask" / "1").mkdir(parents=True)
    pbtxt.write_config(base_config, source / "multitask" / "config.pbtxt")
    variants = [Variant(1, 0, ()), Variant(2, 500, (64,), tokens_per_forward=512)]
    served = build_repository(source, "multitask", variants, tmp_path / "variants")
    assert list(served) == [f"multitask__{v.name}" for v in variants]
    for name, variant in served.items():
        folder = tmp_path / "variants" / name
        assert (folder / "1").resolve() == (source / "multitask" / "1").resolve()
        written = pbtxt.read_config(folder)
        assert written["name"] == name and read_settings(written)["instance_count"] == variant.instance_count
    with pytest.raises(VariantError, match="listed twice"):
        build_repository(source, "multitask", [variants[0], variants[0]], tmp_path / "again")


READY = (
    'I1201 model.py:30] "multitask ready: openvino int8 on CPU ({n} threads, OpenVINO 2026.4.1), tokens per forward"\n'
)


def test_threads_check_compares_the_logged_thread_counts():
    variants = [Variant(2, 0, ()), Variant(1, 0, (), threads=2)]  # auto on 2 cores: 1 each; then one of 2
    assert threads_check(READY.format(n=1) * 2 + READY.format(n=2), variants, cores=2) is None
    problem = threads_check(READY.format(n=1) * 3, variants, cores=2)
    assert "does not read the 'threads' parameter" in problem and "{1: 2, 2: 1}" in problem
    assert "unverified" in threads_check('"multitask ready: torch float32 on cpu"', variants, cores=2)
    assert threads_check('"multitask ready: torch float32 on cpu"', [Variant(1, 0, ())], cores=2) is None


# -- real runs ---------------------------------------------------------------------------------------------------
def _perf(*args: str, timeout: float = 50) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtl_tools.perf", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.e2e
def test_real_perf_analyzer_run_writes_csvs_and_a_plot(triton_server, tmp_path):
    out = tmp_path / "perf"
    # Loose stability and enough windows: the 2-core machine is shared (a fresh-clone run once found no 3
    # agreeing windows in 4); this checks the pipeline, not the numbers.
    result = _perf(
        "run",
        str(ROOT / "data" / "validation.csv"),
        "--url",
        triton_server.grpc_url,
        "--out-dir",
        str(out),
        "--requests",
        "1:2",
        "--requests",
        "64:1",
        "--measurement-ms",
        "2500",
        "--max-trials",
        "10",
        "--stability",
        "1000",
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    with open(out / "perf.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["sentences_per_request"], r["concurrency"]) for r in rows} == {("1", "2"), ("64", "1")}
    assert all(float(r["sentences_per_s"]) > 0 and float(r["p99_us"]) > 0 for r in rows)
    for raw in ("pa_b1_c2.csv", "pa_b64_c1.csv"):  # perf_analyzer's own -f output
        with open(out / raw, newline="") as handle:
            assert float(next(csv.DictReader(handle))["Inferences/Second"]) > 0
    assert (out / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perf_analyzer"]["version"] == "2.50.0" and summary["settings"]["protocol"] == "grpc"
    expected = read_sentences(ROOT / "data" / "validation.csv", limit=1024).texts  # --max-sentences' default
    assert [row["TEXT"]["content"][0] for row in json.loads((out / "input_data.json").read_text())["data"]] == expected


@pytest.mark.e2e
def test_refuses_a_model_that_is_not_ready(triton_server, tmp_path):
    result = _perf(
        "run",
        str(ROOT / "data" / "validation.csv"),
        "--url",
        triton_server.grpc_url,
        "--model",
        "nosuchmodel",
        "--out-dir",
        str(tmp_path),
    )
    assert result.returncode == 1
    assert "nosuchmodel is not READY" in result.stderr and not (tmp_path / "perf.csv").exists()


@pytest.mark.e2e
def test_oversized_requests_are_refused_before_the_run(triton_server, tmp_path):
    # 512 sentences per request exceed the model's max_batch_size (256).
    result = _perf(
        "run",
        str(ROOT / "data" / "validation.csv"),
        "--url",
        triton_server.grpc_url,
        "--out-dir",
        str(tmp_path),
        "--requests",
        "512:1",
    )
    assert result.returncode == 1
    assert "failed a 512-sentence request" in result.stderr and "numpy" not in result.stderr
    assert not (tmp_path / "perf.csv").exists()


@pytest.mark.e2e
def test_an_error_line_fails_the_run_even_when_perf_analyzer_exits_0(triton_server, tmp_path):
    fake = tmp_path / "perf_analyzer"
    fake.write_text(
        "#!/bin/sh\necho 'Request concurrency: 1'\necho 'Thread [0] had error: Stub process is not healthy'\n"
    )
    fake.chmod(0o755)
    result = _perf(
        "run",
        str(ROOT / "data" / "validation.csv"),
        "--url",
        triton_server.grpc_url,
        "--out-dir",
        str(tmp_path / "out"),
        "--requests",
        "1:1",
        "--perf-analyzer",
        str(fake),
    )
    assert result.returncode == 1
    assert (
        "perf: error: perf_analyzer failed (exit code 0)" in result.stderr and "Thread [0] had error" in result.stderr
    )
    assert not (tmp_path / "out" / "perf.csv").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_real_sweep_serves_each_variant_and_reports_what_ran(built_repository, tmp_path):
    out = tmp_path / "sweep"
    result = _perf(
        "sweep",
        str(ROOT / "data" / "validation.csv"),
        "--model-repository",
        str(built_repository),
        "--out-dir",
        str(out),
        "--instances",
        "1",
        "--threads",
        "1",
        "--tokens-per-forward",
        "auto,512",
        "--queue-delays",
        "0",
        "--requests",
        "1:1",
        "--measurement-ms",
        "1000",
        "--max-trials",
        "10",
        "--stability",
        "1000",
        "--max-sentences",
        "64",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["variant"], r["tokens_per_forward"], r["threads"]) for r in rows} == {
        ("i1_t1_kauto_d0_p64-128-256", "auto", "1"),
        ("i1_t1_k512_d0_p64-128-256", "512", "1"),
    }
    assert all(float(r["sentences_per_s"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    # Each instance's ready line names its thread count (torch too): the sweep checks them, and they agree.
    assert not any("threads" in note for note in summary["notes"]), summary["notes"]
    assert summary["commit"]
    assert "threads" in (out / "sweep.md").read_text() and (out / "sweep_b1.png").is_file()


@pytest.mark.parametrize("package", ["mtl_tools.perf", "mtl_tools.bench", "mtl_tools.gpu"])
def test_public_names_are_the_functions_and_classes_not_submodules(package):
    import importlib
    import inspect

    module = importlib.import_module(package)
    # A submodule named like an exported function would replace it on the package (perf.sweep once did).
    shadowed = [name for name in module.__all__ if inspect.ismodule(getattr(module, name))]
    assert not shadowed and all(hasattr(module, name) for name in module.__all__)
