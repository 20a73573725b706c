"""The README's Python API example, run exactly as written (only the URL points at the test server)."""
import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-python-api:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked Python API example"
    return match.group(1)


def test_readme_python_api_snippet_runs(triton_server, monkeypatch):
    code = readme_snippet()
    assert '"localhost:8001"' in code
    monkeypatch.chdir(ROOT)  # the snippet reads data/sample.csv
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace('"localhost:8001"', repr(triton_server.grpc_url)), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == ["finance", "positive"]
    assert lines[1].split()[0] == "tech"
    assert 0.0 < float(lines[1].split()[2]) <= 1.0
