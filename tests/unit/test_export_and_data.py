from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mtl_build.config import load_config
from mtl_build.data import DataError, read_labelled_csv
from mtl_build.export import render_config_pbtxt

ROOT = Path(__file__).resolve().parents[2]


def test_config_pbtxt_parses_as_a_triton_model_config():
    config = load_config(ROOT / "config.yaml")
    parsed = text_format.Parse(render_config_pbtxt(config), model_config_pb2.ModelConfig())
    assert parsed.name == "multitask" and parsed.backend == "python"
    assert parsed.max_batch_size == config.serving.max_batch_size
    assert [(i.name, i.data_type, list(i.dims)) for i in parsed.input] == [("TEXT", model_config_pb2.TYPE_STRING, [1])]
    outputs = {o.name: (o.data_type, list(o.dims)) for o in parsed.output}
    assert outputs == {
        "topic": (model_config_pb2.TYPE_FP32, [3]),
        "sentiment": (model_config_pb2.TYPE_FP32, [3]),
        "TRUNCATED": (model_config_pb2.TYPE_BOOL, [1]),
    }
    assert parsed.dynamic_batching.max_queue_delay_microseconds == config.serving.max_queue_delay_microseconds
    assert list(parsed.dynamic_batching.preferred_batch_size) == config.serving.preferred_batch_sizes
    assert parsed.instance_group[0].count == config.serving.instance_count
    assert parsed.parameters["max_tokens"].string_value == "256"
    assert '"labels": ["negative", "neutral", "positive"]' in parsed.parameters["tasks"].string_value


def test_labels_with_quotes_and_unicode_survive_the_text_format(tmp_path):
    config = load_config(ROOT / "config.yaml")
    tasks = [config.tasks[0].model_copy(update={"labels": ['say "hi"', "caf\u00e9", "back\\slash"]})]
    odd = config.model_copy(update={"tasks": tasks})
    parsed = text_format.Parse(render_config_pbtxt(odd), model_config_pb2.ModelConfig())
    assert 'say \\"hi\\"' in parsed.parameters["tasks"].string_value
    assert "caf\u00e9" in parsed.parameters["tasks"].string_value


@pytest.fixture
def tasks():
    return load_config(ROOT / "config.yaml").tasks


def test_labelled_csv_reads_partial_labels(tmp_path, tasks):
    path = tmp_path / "d.csv"
    path.write_text('text,topic,sentiment\n"Rates rose, again",finance,\nGreat film,entertainment,positive\n')
    data = read_labelled_csv(path, tasks)
    assert data.texts == ["Rates rose, again", "Great film"]
    assert data.labels["topic"].tolist() == [1, 0]
    assert data.labels["sentiment"].tolist() == [-1, 2]
    assert data.labelled_count("sentiment") == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("words,topic\nhello,tech\n", "no 'text' column; columns found: ['words', 'topic']"),
        ("text,topic\nhello,tech\n,finance\n", "row 3, column 'text': empty text"),
        ("text,topic\nhello,sports\n", "row 2, column 'topic': unknown label 'sports'; valid: ['entertainment', 'finance', 'tech']"),
        ("text,topic\n", "no data rows"),
    ],
)
def test_labelled_csv_errors_name_row_and_column(tmp_path, tasks, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_labelled_csv(path, tasks)
    assert message in str(error.value)
