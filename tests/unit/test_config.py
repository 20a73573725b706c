from pathlib import Path

import pytest
import yaml

from mtl_build.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    edit(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


RAW = yaml.safe_load((ROOT / "config.yaml").read_text())
TASK_NAMES = [task["name"] for task in RAW["tasks"]]


def test_project_config_loads_with_tasks_in_order():
    config = load_config(ROOT / "config.yaml")
    assert [t.name for t in config.tasks] == TASK_NAMES
    assert [t.labels for t in config.tasks] == [task["labels"] for task in RAW["tasks"]]
    assert config.resolve(config.data.train) == ROOT / RAW["data"]["train"]


@pytest.mark.parametrize("section", ["training", "serving", "data"])
def test_defaults_are_the_shipped_values(section):
    """A key left out of config.yaml means what the shipped file says (the README documents those values)."""
    from mtl_build import config as config_module

    model = {
        "training": config_module.TrainingConfig,
        "serving": config_module.ServingConfig,
        "data": config_module.DataConfig,
    }[section]
    defaults = model().model_dump(mode="json")
    for key, value in RAW[section].items():
        if key == "task_weights" or (section == "data" and key in ("train", "validation", "challenge")):
            continue  # task names and data paths are the project's own, not defaults
        assert defaults[key] == value, f"{section}.{key}: default {defaults[key]!r}, config.yaml {value!r}"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["serving"].update(device="tpu"), ["serving.device", "'auto', 'cpu' or 'gpu'", "'tpu'"]),
        (lambda c: c["serving"].update(precision="int8"), ["serving.precision", "'auto' or 'float32'", "'int8'"]),
        (lambda c: c["training"].update(mode="lora"), ["training.mode", "'heads_only' or 'joint'", "'lora'"]),
        (
            lambda c: c["serving"].update(max_batch_size=0),
            ["serving.max_batch_size", "greater than or equal to 1", "0"],
        ),
        (lambda c: c["serving"].update(max_bach_size=8), ["serving.max_bach_size", "not a known key"]),
        (lambda c: c["tasks"][0].update(labels=["a", "a"]), ["tasks.0.labels", "unique"]),
        (lambda c: c["tasks"][1].update(name="Sentiment!"), ["tasks.1.name", "Triton output tensor"]),
        (lambda c: c["tasks"].append({"name": "topic", "labels": ["x", "y"]}), ["task names must be unique"]),
        (lambda c: c["tasks"].append({"name": "truncated", "labels": ["x", "y"]}), ["clash", "TRUNCATED"]),
        (
            lambda c: c["serving"].update(preferred_batch_sizes=[512]),
            ["preferred_batch_sizes [512]", "max_batch_size (256)"],
        ),
        (
            lambda c: c["backbone"]["sha256"].update({"config.json": "abc"}),
            ["backbone.sha256", "not a lowercase hex SHA-256"],
        ),
        (
            lambda c: c["training"].update(task_weights={"colour": 2.0}),
            ["unknown tasks ['colour']", f"valid: {TASK_NAMES}"],
        ),
        (lambda c: c["serving"].update(runtime="tensorrt"), ["serving.runtime", "'onnxruntime'", "'tensorrt'"]),
        (lambda c: c["serving"].update(tokens_per_forward=-1), ["serving.tokens_per_forward", "-1"]),
        (lambda c: c["training"].update(autocast="float16"), ["training.autocast", "'bfloat16'", "'float16'"]),
        (lambda c: c["training"].update(label_smoothing=1.5), ["training.label_smoothing", "1.5"]),
        (lambda c: c["tasks"][0].update(descriptions={"sport": "x"}), ["unknown labels ['sport']"]),
        (lambda c: c["serving"].update(output_filename="out.csv"), ["serving.output_filename", "{task}"]),
    ],
)
def test_wrong_values_name_key_value_and_choices(tmp_path, edit, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, edit))
    message = str(error.value)
    for fragment in expected:
        assert fragment in message, message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)
