"""The one-call GPU check: its carried weights, its parity arithmetic and its scripts (the GPU itself comes later)."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruned_fp16_weights_restore_exactly_for_carried_tokens(check):
    torch.manual_seed(0)
    state = {check.EMBEDDING: torch.randn(50, 8), "encoder.other.weight": torch.randn(8, 8), "heads.topic.bias": torch.randn(3)}
    carried = {0, 3, 17, 49}
    packed = check.prune_embedding(state, carried)
    assert packed[f"{check.EMBEDDING}.rows"].shape == (4, 8) and all(v.dtype != torch.float32 for v in packed.values())
    restored, ids = check.restore_embedding(packed, vocab_size=50)
    assert ids == carried and set(restored) == set(state)
    rows = sorted(carried)
    # Bit for bit what model.py's `.to(float16)` makes of the fp32 weights, for every carried row.
    assert torch.equal(restored[check.EMBEDDING][rows], state[check.EMBEDDING][rows].half())
    assert not restored[check.EMBEDDING][[1, 2, 48]].any()
    assert torch.equal(restored["encoder.other.weight"], state["encoder.other.weight"].half())


def test_agreement_counts_rows_whose_every_label_matches(check):
    reference = {"tasks": {"topic": ["a", "b"], "sentiment": ["n", "p"]},
                 "probabilities": {"topic": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
                                   "sentiment": [[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]]}}
    got = {"topic": [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], "sentiment": [[0.6, 0.4], [0.45, 0.55], [0.2, 0.8]]}
    result = check.agreement(reference, got, [0, 1, 2])
    assert result["topic"]["differing_rows"] == 1 and result["sentiment"]["differing_rows"] == 0
    assert result["all_tasks"] == {"rows": 3, "label_agreement": pytest.approx(2 / 3, abs=1e-4), "differing_rows": 1}
    assert result["topic"]["max_abs_prob_diff"] == pytest.approx(0.2)


def test_targets_name_the_numbers_and_whether_each_is_met(check):
    def row(size, conc, rate, p99_ms):
        return {"sentences_per_request": size, "concurrency": conc, "sentences_per_s": rate,
                "requests_per_s": rate / size, "p99_us": p99_ms * 1000}

    served = {"validation": {"all_tasks": {"rows": 270, "label_agreement": 0.9963, "differing_rows": 1}},
              "all_sentences": {"all_tasks": {"rows": 1962, "label_agreement": 0.998, "differing_rows": 4}}}
    lines = check.targets(None, [row(64, 16, 130000, 20), row(1, 256, 26000, 24), row(1, 512, 30000, 40)], served)
    assert "130,000 sentences/s" in lines[0] and lines[0].endswith("MET")
    assert "26,000 requests/s at p99 24.0 ms" in lines[1] and lines[1].endswith("MET")
    assert "99.63% of 270" in lines[2] and lines[2].endswith("MET")
    lines = check.targets(None, [row(64, 8, 53000, 20), row(1, 256, 11000, 47)], None)
    assert lines[0].endswith("NOT MET") and "no run had p99 <= 25 ms" in lines[1] and lines[1].endswith("NOT MET")


def test_device_texts_put_the_validation_set_first(check):
    texts, validation_rows = check.device_texts()
    assert len(texts) == len(set(texts)) and validation_rows == list(range(len(validation_rows)))
    assert 0 < len(validation_rows) < len(texts)


@pytest.mark.parametrize("script", ["run.sh", "prepare.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "gpu" / script)], capture_output=True).returncode == 0


def test_carry_folder_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".carry/MANIFEST.json"], cwd=ROOT)
    assert result.returncode == 0, ".carry/ must stay out of git (it holds ~60 MB of binaries and weights)"
