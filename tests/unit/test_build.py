"""mtl-build end to end on a small labelled set: deterministic, cached, calibrated, checked graphs, and no
half-written output."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtl_build import evaluate, pbtxt
from mtl_build.cli import build
from mtl_build.data import DataError
from multitask_core import files
from multitask_core.served import ServedModel

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    ("The film's ending left the whole cinema in tears of joy", "entertainment", "positive", "review"),
    ("That sequel was a boring, bloated mess", "entertainment", "negative", "review"),
    ("The festival line-up will be announced on Friday", "entertainment", "neutral", "news_lead"),
    ("Shares jumped 12% after record quarterly profits", "finance", "positive", "headline"),
    ("The bank froze my account and charged fees again 😡", "finance", "negative", "social"),
    ("The central bank held its key rate at 4.25%", "finance", "neutral", "headline"),
    ("This laptop is fast, quiet and the battery lasts all day", "tech", "positive", "review"),
    ("The update bricked my phone and support never answered", "tech", "negative", "social"),
    ("The firmware release notes list three security patches", "tech", "neutral", "news_lead"),
]


def small_project(tmp_path: Path, edit=lambda raw: None, columns=("topic", "sentiment", "register")) -> Path:
    for name in ("train", "validation", "challenge"):
        with (tmp_path / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", *columns])
            for text, topic, sentiment, register in ROWS:
                values = {"topic": topic, "sentiment": sentiment, "register": register}
                writer.writerow([text, *(values[c] for c in columns)])
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["data"].update(train="train.csv", validation="validation.csv", challenge="challenge.csv")
    raw["training"].update(epochs=20, joint_epochs=1, batch_size=4, frozen_layers=0)
    raw["serving"]["runtime"] = "torch"  # the int8 graph has its own tests below
    edit(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def quiet(message: str) -> None:
    pass


def predictions(version_dir: Path) -> dict:
    served = ServedModel.open(version_dir, pbtxt.version_folder_config(version_dir), runtime="torch", device="cpu")
    return served.predict([row[0] for row in ROWS]).probabilities


@pytest.mark.parametrize("mode", ["heads_only", "joint"])
def test_two_builds_give_identical_predictions(tmp_path, mode):
    config = small_project(tmp_path)
    first = build(config, tmp_path / "repo_a", mode=mode, log=quiet)
    second = build(config, tmp_path / "repo_b", mode=mode, log=quiet)
    a, b = predictions(first), predictions(second)
    for task in a:
        assert np.array_equal(a[task], b[task]), task
    manifest_a = json.loads((first / "manifest.json").read_text())
    manifest_b = json.loads((second / "manifest.json").read_text())
    assert manifest_a["sha256"][files.WEIGHTS_FILE] == manifest_b["sha256"][files.WEIGHTS_FILE]  # identical weights
    assert not list((tmp_path / "repo_a").glob(".*staging*"))


def test_metrics_json_and_model_card_report_validation_challenge_registers_and_calibration(tmp_path):
    config = small_project(tmp_path)
    version_dir = build(config, tmp_path / "repo", log=quiet)
    metrics = json.loads((version_dir / "metrics.json").read_text())
    for split in ("validation", "challenge"):
        report = metrics[split]
        assert set(report["tasks"]) == {"topic", "sentiment"}
        assert report["tasks"]["topic"]["rows"] == len(ROWS)
        assert sum(map(sum, report["tasks"]["topic"]["confusion_matrix"])) == len(ROWS)
        assert set(report["registers"]) == {row[3] for row in ROWS}
        assert sum(r["topic"]["rows"] for r in report["registers"].values()) == len(ROWS)
    for task, entry in metrics["calibration"].items():
        assert entry["temperature"] > 0
        assert {"before", "after"} <= set(entry["validation"]) and {"before", "after"} <= set(entry["challenge"])
        assert entry["validation"]["after"] == metrics["validation"]["tasks"][task]["ece"]
    assert set(metrics["expected_label_share"]["sentiment"]) == {"negative", "neutral", "positive"}
    assert abs(sum(metrics["expected_label_share"]["topic"].values()) - 1) < 1e-3
    assert metrics["graphs"]["onnxruntime"]["label_agreement"] == {"topic": 1.0, "sentiment": 1.0}
    splits = metrics["graphs"]["onnxruntime"]["splits"]  # the bar holds on each split, not only on the union
    assert {name: part["rows"] for name, part in splits.items()} == {"validation": len(ROWS), "challenge": len(ROWS)}
    card = (version_dir / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Validation", "## Challenge set", "## Calibration", "## Known failure kinds"):
        assert heading in card
    precision = metrics["served_precision"]  # config.yaml's precision auto: what the torch runtime runs here
    float16 = precision["float16_on_cpu"]
    assert float16["rows"] == len(ROWS) and 0.0 < float16["max_abs_diff"] < 0.2  # exactly 0: float32 ran
    assert (version_dir.parent / "config.pbtxt").is_file()
    manifest = json.loads((version_dir / files.MANIFEST_FILE).read_text())
    assert {"model.py", "multitask_core/served.py", "metrics.json", "model.onnx"} <= set(manifest["sha256"])


def test_unchanged_inputs_skip_the_build_and_a_changed_row_rebuilds(tmp_path):
    config = small_project(tmp_path)
    version_dir = build(config, tmp_path / "repo", mode="heads_only", log=quiet)
    built_at = (version_dir / files.WEIGHTS_FILE).stat().st_mtime_ns
    lines = []
    build(config, tmp_path / "repo", mode="heads_only", log=lines.append)
    assert any("inputs unchanged" in line for line in lines)
    assert (version_dir / files.WEIGHTS_FILE).stat().st_mtime_ns == built_at
    rows = (tmp_path / "train.csv").read_text().splitlines()
    rows[1] = rows[1].replace("tears of joy", "tears of happiness")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    lines = []
    build(config, tmp_path / "repo", mode="heads_only", log=lines.append)
    assert any("changed since the last build: data" in line for line in lines)
    assert (version_dir / files.WEIGHTS_FILE).stat().st_mtime_ns != built_at


def test_task_without_labelled_rows_gets_a_zero_shot_head(tmp_path):
    config = small_project(tmp_path, columns=("sentiment",))
    version_dir = build(config, tmp_path / "repo", log=quiet)
    probs = predictions(version_dir)["topic"]
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert metrics["validation"]["tasks"]["topic"]["rows"] == 0
    # The label descriptions alone must sort these clear-cut sentences by topic well above chance (3 of 9).
    labels = ["entertainment", "finance", "tech"]
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    assert sum(p == row[1] for p, row in zip(predicted, ROWS)) >= 7, predicted


def test_joint_mode_updates_the_encoder_and_frozen_layers_stay(tmp_path):
    config = small_project(tmp_path, lambda raw: raw["training"].update(frozen_layers=2))
    heads = build(config, tmp_path / "heads", mode="heads_only", log=quiet)
    joint = build(config, tmp_path / "joint", mode="joint", log=quiet)
    from safetensors.numpy import load_file

    before, after = load_file(heads / "weights.safetensors"), load_file(joint / "weights.safetensors")
    assert np.array_equal(
        before["encoder.encoder.layer.1.attention.self.query.weight"],
        after["encoder.encoder.layer.1.attention.self.query.weight"],
    )  # frozen
    assert not np.array_equal(
        before["encoder.encoder.layer.4.attention.self.query.weight"],
        after["encoder.encoder.layer.4.attention.self.query.weight"],
    )
    assert json.loads((joint / "metrics.json").read_text())["training"]["mode"] == "joint"


def test_bad_label_in_data_fails_before_anything_is_written(tmp_path):
    config = small_project(tmp_path)
    with (tmp_path / "train.csv").open("a") as handle:
        handle.write("An extra row,sports,positive,social\n")
    with pytest.raises(DataError, match="row 11, column 'topic': unknown label 'sports'"):
        build(config, tmp_path / "repo", log=quiet)
    assert not (tmp_path / "repo").exists()


def test_a_row_with_an_unquoted_comma_is_refused(tmp_path):
    config = small_project(tmp_path)
    with (tmp_path / "train.csv").open("a") as handle:
        handle.write("Shares rose, but the bank warned,finance,neutral,headline\n")
    with pytest.raises(DataError, match="row 11: 5 fields but the header has 4"):
        build(config, tmp_path / "repo", log=quiet)


def test_a_graph_below_the_agreement_bar_fails_the_build_and_installs_nothing(tmp_path, monkeypatch):
    config = small_project(tmp_path, lambda raw: raw["serving"].update(device="gpu"))  # GPU target: ONNX only
    monkeypatch.setattr(evaluate, "agreement", _one_label_differs(evaluate.agreement))
    with pytest.raises(evaluate.GraphCheckError, match="onnxruntime graph gives the float32 labels on only"):
        build(config, tmp_path / "repo", log=quiet)
    assert not (tmp_path / "repo" / "multitask").exists()
    assert not list((tmp_path / "repo").glob(".*staging*"))


def _one_label_differs(real):
    """evaluate.agreement as if the candidate graph flipped the first row's label of every task."""

    def agreement(candidate, reference):
        flipped = {name: np.roll(probs, 1, axis=1) if len(probs) else probs for name, probs in candidate.items()}
        flipped = {name: np.concatenate([flipped[name][:1], candidate[name][1:]]) for name in candidate}
        return real(flipped, reference)

    return agreement


@pytest.mark.slow
def test_int8_graph_is_chosen_on_validation_and_refused_below_the_bar(tmp_path, monkeypatch):
    config = small_project(tmp_path, lambda raw: raw["serving"].update(runtime="openvino", min_label_agreement=0.5))
    version_dir = build(config, tmp_path / "repo", mode="heads_only", log=quiet)
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert metrics["quantization"]["plan"] and metrics["quantization"]["calibration_texts"] == len(ROWS)
    assert (version_dir / files.OPENVINO_FILE).is_file()
    served = ServedModel.open(version_dir, pbtxt.version_folder_config(version_dir))
    assert served.runtime.name == "openvino"  # runtime openvino in config.pbtxt
    # The bar as shipped, and every plan flips a label: the build fails and installs nothing.
    strict = small_project(tmp_path, lambda raw: raw["serving"].update(runtime="openvino"))
    monkeypatch.setattr(evaluate, "agreement", _one_label_differs(evaluate.agreement))
    with pytest.raises(Exception, match="no int8 plan kept the float32 labels"):
        build(strict, tmp_path / "repo2", mode="heads_only", log=quiet)
    assert not (tmp_path / "repo2" / "multitask").exists()
