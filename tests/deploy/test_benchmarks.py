"""The benchmark (python -m mtl_tools.bench): its workloads, ratios, quality arithmetic and report, the peers'
exported graphs, and real runs (figures are not asserted: they are measured in the benchmark, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtl_tools.bench import cli as bench_cli
from mtl_tools.bench.measure import Timing, summarize
from mtl_tools.bench.quality import cosine, label_agreement
from mtl_tools.bench.report import markdown, update_doc
from mtl_tools.bench.run import contender_help, ratios
from mtl_tools.bench.workloads import calibration_texts, data_texts, split_by_length, workloads

ROOT = Path(__file__).resolve().parents[2]


def test_workloads_are_fixed_real_halves_of_the_data():
    short, long = workloads(300)
    again = workloads(300)
    assert [w.texts for w in again] == [short.texts, long.texts] and len(short.texts) == len(long.texts) == 300
    texts = data_texts()
    shorter, longer, median = split_by_length(texts)
    assert set(short.texts) <= set(shorter) and set(long.texts) <= set(longer)
    assert max(map(len, short.texts)) < median <= min(map(len, long.texts))
    assert "data/train.csv" in short.source and short.fingerprint != long.fingerprint
    # More than a half holds: every text of it once before any repeats.
    many = workloads(len(shorter) + 5, names=("short",))[0].texts
    assert len(set(many[: len(shorter)])) == len(shorter) and len(many) == len(shorter) + 5


def test_fallback_when_the_data_files_are_absent(tmp_path):
    short, long = workloads(100, files=(tmp_path / "missing.csv",))
    assert len(short.texts) == 100 and "fallback" in short.source and all(t.strip() for t in long.texts)


def test_calibration_texts_come_from_the_training_split():
    texts = calibration_texts()
    assert len(texts) == 300 == len(set(texts)) and texts == calibration_texts()
    assert set(texts) <= set(data_texts(files=(ROOT / "data" / "train.csv",)))


def test_update_doc_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    update_doc(doc, "cpu", "first cpu run")
    update_doc(doc, "nvidia-h100", "gpu run")
    update_doc(doc, "cpu", "second cpu run")
    text = doc.read_text()
    assert "Hand-written analysis stays." in text and "gpu run" in text
    assert "second cpu run" in text and "first cpu run" not in text and text.count(":cpu:begin") == 1


def _entry(rate: float) -> dict:
    return summarize([Timing(100 / rate, 1.0, 0.0)], 100)


def test_ratios_are_to_the_fastest_peer_of_each_workload():
    results = {
        "st-float32": {"short": _entry(300), "long": _entry(200)},
        "ov-int8": {"short": _entry(600), "long": _entry(150)},
        "client": {"short": _entry(660), "long": _entry(180)},
        "cli": {"short": _entry(500), "long": _entry(190)},
    }
    kinds = {
        "st-float32": {"kind": "peer"},
        "ov-int8": {"kind": "peer"},
        "client": {"kind": "product"},
        "cli": {"kind": "product"},
    }
    out = ratios(results, kinds, ["short", "long"])
    assert out["short"]["fastest_peer"] == "ov-int8" and out["long"]["fastest_peer"] == "st-float32"
    assert out["short"]["products"]["client"] == {"ratio": 1.1, "target": 1.0, "met": True}
    assert out["short"]["products"]["cli"] == {"ratio": pytest.approx(0.833, abs=1e-3), "target": 0.9, "met": False}
    assert out["long"]["products"]["cli"]["ratio"] == 0.95 and out["long"]["products"]["cli"]["met"]


def test_summary_is_the_median_of_the_repetitions():
    timings = [Timing(1.0, 2.0, 0.01), Timing(2.0, 2.0, 0.3), Timing(0.5, 1.0, 0.0)]
    summary = summarize(timings, 100)
    assert summary["sentences_per_s"] == 100.0 and summary["repetitions"] == 3
    assert summary["sentences_per_cpu_s"] == 50.0 and summary["others_share"] == 0.3
    assert summary["spread"] == 1.5  # (200 - 50) / 100


def test_quality_arithmetic():
    reference = np.array([[1.0, 0.0], [0.0, 2.0]])
    result = cosine(np.array([[2.0, 0.0], [1.0, 1.0]]), reference)
    assert result["mean_cosine"] == pytest.approx((1 + 2**-0.5) / 2, abs=1e-5)
    assert result["min_cosine"] == pytest.approx(2**-0.5, abs=1e-5)
    labels = label_agreement(
        {"topic": ["a", "b", "c"], "sentiment": ["n", "p", "p"]},
        {"topic": ["a", "b", "b"], "sentiment": ["n", "n", "p"]},
    )
    assert labels == {"topic": 0.66667, "sentiment": 0.66667, "all_tasks": 0.33333, "rows": 3}


def _report(others: float = 0.0) -> dict:
    results = {"st-float32": {"short": {**_entry(300), "others_share": others}}, "client": {"short": _entry(330)}}
    contenders = {
        "st-float32": {"kind": "peer", "detail": "float32 on cpu"},
        "client": {"kind": "product", "detail": "127.0.0.1:1, batch 64, 4 in flight"},
    }
    return {
        "label": "cpu",
        "date": "2026-12-01T00:00:00+00:00",
        "commit": "abc1234",
        "command": "python -m mtl_tools.bench",
        "machine": {
            "cpu_summary": "AMD EPYC (Zen 4), 2 cores, AVX512-BF16, no AMX",
            "platform": "Linux",
            "load_average": [0.1, 0.1, 0.1],
            "load_after": [0.2, 0.1, 0.1],
        },
        "versions": {"torch": "2.13.0"},
        "threads": 2,
        "repeats": 3,
        "device": "cpu",
        "workloads": {
            "short": {
                "name": "short",
                "count": 100,
                "source": "data",
                "mean_characters": 50.0,
                "mean_tokens": 14.0,
                "fingerprint": "f",
            }
        },
        "model_repository": "repo",
        "model_config": {},
        "contenders": contenders,
        "results": results,
        "quality": {"client": {"short": {"topic": 1.0, "sentiment": 0.99, "all_tasks": 0.99, "rows": 100}}},
        "ratios": ratios(results, contenders, ["short"]),
        "errors": [],
    }


def test_markdown_names_the_machine_the_commit_the_ratios_and_the_noise():
    text = markdown(_report())
    assert "AMD EPYC (Zen 4)" in text and "commit abc1234" in text and "| **client** | 330.0 | 1.10× |" in text
    assert "client 1.10× the fastest peer (st-float32" in text and "MET" in text and "not clean" not in text
    assert "topic 100.00%, sentiment 99.00%" in text
    assert "these figures are not clean" in markdown(_report(others=0.4))


def test_help_lists_every_contender_and_every_option_has_help():
    result = subprocess.run(
        [sys.executable, "-m", "mtl_tools.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    assert all(f" {name} " in flat for name in contender_help())
    missing = [p.name for p in bench_cli.main.params if p.name != "help" and not getattr(p, "help", None)]
    assert not missing, f"options without help text: {missing}"


def test_refuses_an_unbuilt_repository_and_an_unknown_contender(tmp_path):
    def bench(*args):
        return subprocess.run(
            [sys.executable, "-m", "mtl_tools.bench", *args], capture_output=True, text=True, timeout=120
        )

    result = bench("--model-repository", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "holds no built model" in result.stderr and not (tmp_path / "out").exists()
    result = bench("--contenders", "st-float32,nosuch")
    assert result.returncode == 2 and "unknown contenders ['nosuch']" in result.stderr


@pytest.mark.slow
def test_peer_graphs_are_made_once_and_stay_close_to_float32(tmp_path):
    import torch

    from mtl_build.backbone import default_backbone_path
    from mtl_tools.bench.peers import load_peers

    torch.set_num_threads(2)
    texts = workloads(48, names=("long",))[0].texts
    calibration = calibration_texts()[:16]
    peers, made = load_peers(
        ["st-float32", "ort-int8", "ov-int8"],
        default_backbone_path(),
        "cpu",
        2,
        calibration,
        tmp_path,
        log=lambda _m: None,
    )
    assert set(made["seconds"]) == {"encoder.onnx", "encoder_int8_dynamic.onnx", "encoder_int8.xml"}
    reference = peers["st-float32"].encode(texts)
    assert reference.shape == (48, 384)
    for name in ("ort-int8", "ov-int8"):
        embeddings = peers[name].encode(texts)
        assert embeddings.shape == reference.shape and cosine(embeddings, reference)["min_cosine"] > 0.95, name
    files = sorted(Path(made["folder"]).iterdir())
    again, made_again = load_peers(
        ["ort-int8"], default_backbone_path(), "cpu", 2, calibration, tmp_path, log=lambda _m: None
    )
    assert made_again == made and sorted(Path(made["folder"]).iterdir()) == files  # nothing made twice
    assert np.allclose(again["ort-int8"].encode(texts[:4]), peers["ort-int8"].encode(texts[:4]), atol=1e-5)


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtl_tools.bench", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
def test_in_process_run_writes_results_and_touches_no_doc_without_the_flag(built_repository, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    result = _bench(
        "--model-repository",
        str(built_repository),
        "--contenders",
        "st-float32,core",
        "--sentences",
        "64",
        "--repeats",
        "1",
        "--workloads",
        "short",
        "--out",
        str(tmp_path / "out"),
        "--doc",
        str(doc),
        "--device",
        "cpu",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "cpu.json").read_text())
    assert report["workloads"]["short"]["count"] == 64 and report["results"]["core"]["short"]["sentences_per_s"] > 0
    assert report["ratios"]["short"]["fastest_peer"] == "st-float32" and "core" in report["ratios"]["short"]["products"]
    assert report["quality"]["core"]["short"]["rows"] == 64 and report["commit"]
    assert (tmp_path / "out" / "cpu.md").read_text().startswith("### cpu:") and doc.read_text() == "# Benchmarks\n"


@pytest.mark.e2e
@pytest.mark.slow
def test_product_through_the_real_server_is_a_ratio_to_the_peer(built_repository, tmp_path):
    doc = tmp_path / "benchmarks.md"
    result = _bench(
        "--model-repository",
        str(built_repository),
        "--contenders",
        "st-float32,client,cli,perf",
        "--perf-requests",
        "1:1",
        "--stability",
        "1000",
        "--sentences",
        "64",
        "--repeats",
        "2",
        "--workloads",
        "long",
        "--out",
        str(tmp_path / "out"),
        "--label",
        "smoke",
        "--write-docs",
        "--doc",
        str(doc),
        "--device",
        "cpu",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "smoke.json").read_text())
    products = report["ratios"]["long"]["products"]
    assert set(products) == {"client", "cli"} and all(p["ratio"] > 0 for p in products.values())
    assert report["results"]["client"]["long"]["repetitions"] == 2
    assert report["quality"]["client"]["long"]["rows"] == 64 and report["server"]["grpc_url"]
    assert "<!-- mtl_tools.bench:smoke:begin -->" in doc.read_text() and "| **cli** |" in doc.read_text()
    assert report["results"]["perf"]["best"]["1"]["sentences_per_s"] > 0 and not report["errors"]
    assert (tmp_path / "out" / "smoke-perf" / "perf.csv").is_file()
