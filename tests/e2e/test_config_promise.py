"""The README's promise, tested: add a task and change max_tokens in config.yaml, rebuild, serve, score.

No code changes: the build, the served model, the server and the client all take the new task and the new
limit from the config.
"""

import csv

import pytest
from click.testing import CliRunner
from testproject import write_project

from mtl_build.cli import build
from mtl_client import MultiTaskClient
from mtl_client.cli import main as client_main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
URGENCY = {
    "name": "urgency",
    "labels": ["routine", "urgent"],
    "descriptions": {"routine": "can wait, no hurry", "urgent": "needs action right now, an emergency"},
}
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def third_task_repository(tmp_path_factory):
    folder = tmp_path_factory.mktemp("third-task")

    def edit(raw):
        raw["tasks"].append(URGENCY)
        raw["backbone"]["max_tokens"] = MAX_TOKENS
        raw["serving"]["model_name"] = "triage"

    config = write_project(folder, edit, subset={"train": 300, "validation": 60, "challenge": 60})
    build(config, folder / "repo", log=lambda message: None)
    return folder / "repo"


def test_a_third_task_and_a_new_token_limit_reach_the_client(third_task_repository, local_triton, tmp_path):
    server = local_triton(repository=third_task_repository)
    long_text = "The quarterly report ran on and on about margins " * 30  # far past 64 tokens
    with MultiTaskClient(server.grpc_url, model="triage") as client:
        contract = client.get_contract()
        assert contract.task_names[-1] == "urgency" and contract.task("urgency").labels == ("routine", "urgent")
        assert contract.max_tokens == MAX_TOKENS
        predictions = client.predict(["The server room is on fire, evacuate now!", long_text])
    assert set(predictions[0].tasks) == set(contract.task_names)
    assert predictions[0].tasks["urgency"].label in ("routine", "urgent")
    assert [p.truncated for p in predictions] == [False, True]

    source = tmp_path / "in.csv"
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows([["id", "text"], ["a", "Please call me back about the invoice"], ["b", long_text]])
    result = CliRunner().invoke(
        client_main,
        ["predict", str(source), "--url", server.grpc_url, "--model", "triage", "--out-dir", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert files == {f"{name}_predictions.csv" for name in contract.task_names}
    with (tmp_path / "out" / "urgency_predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["a", "b"] and [r["truncated"] for r in rows] == ["false", "true"]
