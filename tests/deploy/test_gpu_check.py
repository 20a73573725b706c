"""The one-call GPU check (mtl_tools.gpu): its carried weights, what the stub must import, its parity arithmetic
and its scripts (the GPU itself comes later; the CPU try-out in docs/gpu.md runs the whole path here)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from mtl_build import pbtxt
from mtl_build.export import render_model_config
from mtl_tools.gpu import (
    agreement,
    core_imports,
    prune_embedding,
    reference_texts,
    restore_embedding,
    stub_modules,
    targets,
)
from mtl_tools.gpu.pack import CPU_RUNTIME_ONLY, IMAGE_PROVIDES, WHEELS, check_servable
from mtl_tools.gpu.weights import EMBEDDING, join_bytes, split_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_pruned_fp16_weights_restore_exactly_for_carried_tokens():
    torch.manual_seed(0)
    state = {
        EMBEDDING: torch.randn(50, 8),
        "encoder.other.weight": torch.randn(8, 8),
        "heads.topic.bias": torch.randn(3),
    }
    carried = {0, 3, 17, 49}
    packed = prune_embedding(state, carried)
    assert packed[f"{EMBEDDING}.rows"].shape == (4, 8) and all(v.dtype != torch.float32 for v in packed.values())
    restored, ids = restore_embedding(packed, vocab_size=50)
    assert ids == carried and set(restored) == set(state)
    rows = sorted(carried)
    # Bit for bit what the torch runtime's `.to(float16)` makes of the fp32 weights, for every carried row.
    assert torch.equal(restored[EMBEDDING][rows], state[EMBEDDING][rows].half())
    assert not restored[EMBEDDING][[1, 2, 48]].any()
    assert torch.equal(restored["encoder.other.weight"], state["encoder.other.weight"].half())


def test_every_module_the_served_core_imports_is_on_the_gpu_image_or_carried():
    imports = core_imports()
    assert "emoji" in imports["module"]  # the normalisation maps emoji to words
    needed = stub_modules()
    missing = [m for m in needed if m not in IMAGE_PROVIDES and m not in WHEELS]
    assert not missing, f"the GPU stub would fail to import {missing}: add them to WHEELS"
    # The CPU runtimes are imported inside their classes only: the GPU's torch runtime never needs them.
    assert not set(CPU_RUNTIME_ONLY) & imports["module"] and not set(CPU_RUNTIME_ONLY) & set(needed)


def test_run_sh_puts_every_package_of_the_checkout_on_pythonpath():
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    script = (ROOT / "gpu" / "run.sh").read_text()
    line = next(line for line in script.splitlines() if line.startswith("export PYTHONPATH="))
    for package, folder in package_dirs.items():
        assert f"$REPO/{Path(folder).parent.as_posix()}" in line, f"{package} ({folder}) is not on run.sh's PYTHONPATH"


def test_the_device_step_imports_nothing_the_carry_brings():
    # tritonclient (and the client) arrive with the carry: importing the device side must not need them.
    probe = (
        "import sys, mtl_tools.gpu.device, mtl_tools.gpu.cli; "
        "assert not [m for m in sys.modules if m.startswith(('tritonclient', 'mtl_client'))], 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_prepare_refuses_a_repository_built_for_an_exported_graph(test_config, tmp_path):
    config = render_model_config(test_config)
    version = tmp_path / "multitask" / "1"
    version.mkdir(parents=True)
    (version / "weights.safetensors").write_bytes(b"")
    for runtime, refused in (("torch", False), ("auto", False), ("openvino", True), ("onnxruntime", True)):
        config["parameters"]["runtime"] = {"string_value": runtime}
        pbtxt.write_config(config, tmp_path / "multitask" / "config.pbtxt")
        if refused:
            with pytest.raises(SystemExit, match=f"runtime '{runtime}'"):
                check_servable(tmp_path)
        else:
            assert check_servable(tmp_path) == version
    with pytest.raises(SystemExit, match="holds no built model"):
        check_servable(tmp_path / "nothing")


def test_split_bytes_round_trip():
    for data in (b"", b"a", b"ab", bytes(range(256)) * 3 + b"x"):
        assert join_bytes(split_bytes(data)) == data
    assert split_bytes(b"\x01\x02\x03\x04") == b"\x01\x03\x02\x04"


def test_agreement_counts_rows_whose_every_label_matches():
    reference = {
        "tasks": {"topic": ["a", "b"], "sentiment": ["n", "p"]},
        "probabilities": {
            "topic": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
            "sentiment": [[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]],
        },
    }
    got = {"topic": [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], "sentiment": [[0.6, 0.4], [0.45, 0.55], [0.2, 0.8]]}
    result = agreement(reference, got)
    assert result["topic"]["differing_rows"] == 1 and result["sentiment"]["differing_rows"] == 0
    assert result["all_tasks"] == {"rows": 3, "label_agreement": pytest.approx(2 / 3, abs=1e-4), "differing_rows": 1}
    assert result["topic"]["max_abs_prob_diff"] == pytest.approx(0.2)


def test_targets_name_the_numbers_and_whether_each_is_met():
    def row(size, conc, rate, p99_ms):
        return {
            "sentences_per_request": size,
            "concurrency": conc,
            "sentences_per_s": rate,
            "requests_per_s": rate / size,
            "p99_us": p99_ms * 1000,
        }

    served = {"all_tasks": {"rows": 270, "label_agreement": 0.9963, "differing_rows": 1}}
    lines = targets(None, [row(64, 16, 130000, 20), row(1, 256, 26000, 24), row(1, 512, 30000, 40)], served)
    assert "130,000 sentences/s" in lines[0] and lines[0].endswith("MET")
    assert "26,000 requests/s at p99 24.0 ms" in lines[1] and lines[1].endswith("MET")
    assert "99.63% of 270" in lines[2] and lines[2].endswith("MET")
    lines = targets(None, [row(64, 8, 53000, 20), row(1, 256, 11000, 47)], None)
    assert lines[0].endswith("NOT MET") and "no run had p99 <= 25 ms" in lines[1] and lines[1].endswith("NOT MET")
    # The benchmark's perf_analyzer rows count too.
    bench = {"results": {"perf": {"rows": [row(64, 4, 125000, 30)]}}}
    assert targets(bench, [], None)[0].startswith("64-sentence requests: best 125,000")


def test_reference_texts_are_the_unique_validation_texts():
    from mtl_tools.bench.workloads import read_texts

    texts = reference_texts()
    assert len(texts) == len(set(texts)) and set(texts) == set(read_texts(ROOT / "data" / "validation.csv"))


@pytest.mark.parametrize("script", ["run.sh", "prepare.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "gpu" / script)], capture_output=True).returncode == 0


def test_carry_folder_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".carry/MANIFEST.json"], cwd=ROOT)
    assert result.returncode == 0, ".carry/ must stay out of git (it holds ~60 MB of binaries and weights)"
