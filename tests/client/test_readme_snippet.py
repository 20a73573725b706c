"""The README's Python API example, run exactly as written (only the URL points at the test server)."""

import contextlib
import csv
import io
import re
from pathlib import Path

import pytest

from mtl_client import MultiTaskClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SAMPLE = "data/sample.csv"


def readme_snippet(readme: Path | None = None) -> str:
    text = (readme or README).read_text()
    match = re.search(r"<!-- readme-python-api:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked Python API example"
    return match.group(1)


def test_readme_python_api_snippet_runs(triton_server, test_config, monkeypatch):
    code = readme_snippet()
    assert '"localhost:8001"' in code
    monkeypatch.chdir(ROOT)  # the snippet reads data/sample.csv
    # What the snippet's predict and predict_iter were given and gave back, and every file it opened.
    predicted, streamed = [], []
    predict, predict_iter = MultiTaskClient.predict, MultiTaskClient.predict_iter

    def recording_predict(self, texts, *args, **kwargs):
        result = predict(self, texts, *args, **kwargs)
        predicted.extend(result)
        return result

    def recording_predict_iter(self, texts, *args, **kwargs):
        def tap():
            for text in texts:
                streamed.append(text)
                yield text

        return predict_iter(self, tap(), *args, **kwargs)

    monkeypatch.setattr(MultiTaskClient, "predict", recording_predict)
    monkeypatch.setattr(MultiTaskClient, "predict_iter", recording_predict_iter)
    opened = []

    def tracking_open(*args, **kwargs):
        handle = open(*args, **kwargs)  # noqa: SIM115 - the snippet's own open, watched to see it closed
        opened.append(handle)
        return handle

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(code.replace('"localhost:8001"', repr(triton_server.grpc_url)), "README.md", "exec"),
            {"open": tracking_open},
        )
    lines = out.getvalue().splitlines()

    # The first lines: each text's labels of the first two tasks and the second task's score, as the server said.
    first, second = test_config.tasks[0].name, test_config.tasks[1].name
    assert predicted and len(lines) == len(predicted) + 1
    for line, prediction in zip(lines, predicted, strict=False):
        label_1, label_2, score = line.split()
        assert (label_1, label_2) == (prediction[first].label, prediction[second].label)
        assert float(score) == pytest.approx(prediction[second].score)
    # The stream scored the sample's texts (not its raw lines) and the file was closed afterwards.
    with open(ROOT / SAMPLE, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    assert streamed == texts
    assert lines[-1] == f"{len(texts)} rows of {SAMPLE} scored"
    assert opened and all(handle.closed for handle in opened)
