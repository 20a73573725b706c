"""benchmarks/run.py: the fixed sentence set, its report, and one quick real contender."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import parse_pbtxt_parameters, ratios, update_doc
from benchmarks.sentences import benchmark_sentences, fingerprint

ROOT = Path(__file__).resolve().parents[2]


def test_sentences_are_fixed_real_and_the_requested_count():
    first, source = benchmark_sentences(300)
    again, _ = benchmark_sentences(300)
    assert first == again and len(first) == 300 and fingerprint(first) == fingerprint(again)
    assert "data/train.csv" in source
    more, _ = benchmark_sentences(5000)
    # Every data row once before any repeats, in the same order for every count.
    assert len(more) == 5000 and more[:300] == first and len(set(more)) == len(set(more[:len(set(more))]))


def test_fallback_when_the_data_files_are_absent(tmp_path):
    texts, source = benchmark_sentences(100, files=(tmp_path / "missing.csv",))
    assert len(texts) == 100 and "fallback" in source and all(t.strip() for t in texts)


def test_update_doc_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    update_doc(doc, "cpu", "first cpu run")
    update_doc(doc, "nvidia-h100", "gpu run")
    update_doc(doc, "cpu", "second cpu run")
    text = doc.read_text()
    assert "Hand-written analysis stays." in text and "gpu run" in text
    assert "second cpu run" in text and "first cpu run" not in text and text.count(":cpu:begin") == 1


def test_parameters_are_read_from_the_generated_config():
    from mtl_build.config import load_config
    from mtl_build.export import render_config_pbtxt

    parameters = parse_pbtxt_parameters(render_config_pbtxt(load_config(ROOT / "config.yaml")))
    assert [t["name"] for t in json.loads(parameters["tasks"])] == ["topic", "sentiment"]
    assert parameters["max_tokens"] == "256"


def test_ratios_compare_the_server_with_both_in_process_contenders():
    results = {"a": {"one_call": {"sentences_per_s": 300.0}, "per_request": {"sentences_per_s": 250.0}},
               "b": {"forward": {"sentences_per_s": 400.0}, "tokenize_forward": {"sentences_per_s": 320.0}},
               "c": {"client_lib": {"sentences_per_s": 330.0}, "cli": {"sentences_per_s": 300.0}}}
    out = ratios(results)
    assert out["c(client_lib)/a(one call)"] == 1.1 and out["c(cli)/b2(tokenize+forward)"] == pytest.approx(0.938, abs=1e-3)


@pytest.mark.e2e
def test_in_process_contender_runs_on_the_built_model(built_repository, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--sentences", "64", "--skip", "a,c,d",
                             "--model-repository", str(built_repository), "--results", str(tmp_path),
                             "--doc", str(tmp_path / "benchmarks.md"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=55)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["sentences"]["count"] == 64 and report["results"]["b"]["forward"]["sentences_per_s"] > 0
    assert "b2. multitask_core tokenize + forward" in (tmp_path / "benchmarks.md").read_text()
