"""mtl-build end to end on a small labelled set: deterministic, zero-shot heads, joint mode, no half-written output."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtl_build.cli import build
from mtl_build.evaluate import ServedModel
from mtl_build.config import load_config
from mtl_build.serving_core import core

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    ("The film's ending left the whole cinema in tears of joy", "entertainment", "positive"),
    ("That sequel was a boring, bloated mess", "entertainment", "negative"),
    ("The festival line-up will be announced on Friday", "entertainment", "neutral"),
    ("Shares jumped 12% after record quarterly profits", "finance", "positive"),
    ("The bank froze my account and charged fees again", "finance", "negative"),
    ("The central bank held its key rate at 4.25%", "finance", "neutral"),
    ("This laptop is fast, quiet and the battery lasts all day", "tech", "positive"),
    ("The update bricked my phone and support never answered", "tech", "negative"),
    ("The firmware release notes list three security patches", "tech", "neutral"),
]


def small_project(tmp_path: Path, edit=lambda raw: None, columns=("topic", "sentiment")) -> Path:
    for name in ("train", "validation"):
        with (tmp_path / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", *columns])
            for text, topic, sentiment in ROWS:
                values = {"topic": topic, "sentiment": sentiment}
                writer.writerow([text, *(values[c] for c in columns)])
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["data"] = {"train": "train.csv", "validation": "validation.csv"}
    raw["training"]["epochs"] = 20
    edit(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def predictions(version_dir: Path, config_path: Path) -> dict:
    served = ServedModel.load(version_dir, load_config(config_path))
    return served.probabilities([text for text, _, _ in ROWS])


@pytest.mark.parametrize("mode", ["heads_only", "joint"])
def test_two_builds_give_identical_predictions(tmp_path, mode):
    config = small_project(tmp_path, lambda raw: raw["training"].update(joint_epochs=1, batch_size=4))
    first = build(config, tmp_path / "repo_a", mode=mode)
    second = build(config, tmp_path / "repo_b", mode=mode)
    a, b = predictions(first, config), predictions(second, config)
    for task in a:
        assert np.array_equal(a[task], b[task]), task
    manifest_a = json.loads((first / "manifest.json").read_text())
    manifest_b = json.loads((second / "manifest.json").read_text())
    assert manifest_a == manifest_b  # byte-identical weights
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["validation"]["topic"]["rows"] == len(ROWS)
    assert sum(map(sum, metrics["validation"]["topic"]["confusion_matrix"])) == len(ROWS)
    assert (first / "MODEL_CARD.md").read_text().startswith("# Model card: multitask")
    precision = metrics["served_precision"]  # config.yaml's precision auto: what model.py runs on this CPU
    assert precision["cpu_dtype"] == str(core.pick_dtype(torch.device("cpu"), "auto")).removeprefix("torch.")
    if precision["cpu_dtype"] != "float32":
        assert precision["rows"] == len(ROWS) and set(precision["label_agreement"]) == {"topic", "sentiment"}
        assert all(0.0 <= value <= 1.0 for value in precision["label_agreement"].values())
        assert 0.0 < precision["max_abs_diff"] < 0.2
    float16 = precision["float16_on_cpu"]  # precision auto: the GPU's type, computed here with CPU kernels
    assert float16["rows"] == len(ROWS) and set(float16["label_agreement"]) == {"topic", "sentiment"}
    assert all(0.0 <= value <= 1.0 for value in float16["label_agreement"].values())
    assert 0.0 < float16["max_abs_diff"] < 0.2  # float16 does round: exactly 0 would mean float32 ran
    card = (first / "MODEL_CARD.md").read_text()
    assert "float16 (served on a GPU), run here with CPU kernels: labels equal to float32 on 9 validation rows" in card
    assert (first.parent / "config.pbtxt").is_file()
    assert not list((tmp_path / "repo_a").glob(".*staging*"))


def test_task_without_labelled_rows_gets_a_zero_shot_head(tmp_path):
    config = small_project(tmp_path, columns=("sentiment",))
    version_dir = build(config, tmp_path / "repo")
    probs = predictions(version_dir, config)["topic"]
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert metrics["validation"]["topic"]["rows"] == 0
    # The label descriptions alone must sort these clear-cut sentences by topic well above chance (3 of 9).
    labels = ["entertainment", "finance", "tech"]
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    assert sum(p == topic for p, (_, topic, _) in zip(predicted, ROWS)) >= 7, predicted


def test_joint_mode_updates_the_encoder(tmp_path):
    config = small_project(tmp_path, lambda raw: raw["training"].update(joint_epochs=1, batch_size=4))
    heads = build(config, tmp_path / "heads", mode="heads_only")
    joint = build(config, tmp_path / "joint", mode="joint")
    from safetensors.numpy import load_file

    key = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not np.array_equal(load_file(heads / "weights.safetensors")[key], load_file(joint / "weights.safetensors")[key])
    assert json.loads((joint / "metrics.json").read_text())["training"]["mode"] == "joint"


def test_bad_label_in_data_fails_before_anything_is_written(tmp_path):
    config = small_project(tmp_path)
    with (tmp_path / "train.csv").open("a") as handle:
        handle.write("An extra row,sports,positive\n")
    from mtl_build.data import DataError

    with pytest.raises(DataError, match="row 11, column 'topic': unknown label 'sports'"):
        build(config, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
