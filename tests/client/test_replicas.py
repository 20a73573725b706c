"""Several replicas behind one client, against real Triton servers: round robin, a replica that stops or dies
in the middle of a run (SDK and CLI), one that comes back, one that serves another contract, and gRPC's own
round_robin policy over one target with several addresses.

The shared `triton_server` is the survivor; the replicas that are stopped are this module's own (`local_triton`).
Who served what is read from each server's Triton metrics (requests and rows answered by the model). The
servers' watchdogs send one-row canary inferences meanwhile, so the tests send full batches only and count
those (`full_batches`).
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtl_client import AsyncMultiTaskClient, ModelContractError, MultiTaskClient, ServerUnavailableError
from mtl_client.base import normalize_urls
from mtl_client.cli import main
from mtl_client.endpoints import EndpointPool
from mtl_client.errors import MTLClientError

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BATCH = 32
ROWS = 31 * BATCH
CONCURRENCY = 4


@pytest.fixture(scope="module")
def texts() -> list[str]:
    found = []
    for split in ("validation", "train"):
        with open(ROOT / "data" / f"{split}.csv", newline="", encoding="utf-8") as handle:
            found.extend(row["text"] for row in csv.DictReader(handle) if row["text"].strip())
    return found[:ROWS]


@pytest.fixture(scope="module")
def model(test_config) -> str:
    return test_config.serving.model_name


def served(server, model: str) -> tuple[int, int]:
    """(requests, rows) the server's model answered successfully so far, from Triton's metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts = {"nv_inference_request_success": 0, "nv_inference_count": 0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        family = name.partition("{")[0]
        if family in counts and f'model="{model}"' in name:
            counts[family] += int(float(value))
    return counts["nv_inference_request_success"], counts["nv_inference_count"]


def delta(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def full_batches(change: tuple[int, int]) -> int:
    """How many BATCH-row requests a change of (requests, rows) holds besides one-row canaries."""
    requests, rows = change
    batches, rest = divmod(rows - requests, BATCH - 1)
    assert rest == 0 and batches >= 0, f"{change} is not full batches plus one-row canaries"
    return batches


def batches_since(server, model: str, before: tuple[int, int]) -> int:
    return full_batches(delta(served(server, model), before))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def stop_when_served(survivor, victim, model: str, rows: int, stop, timeout_s: float = 120):
    """A thread that waits until both servers together answered `rows` rows, notes the victim's count, then
    runs `stop`. Its `result` dict gets the victim's (requests, rows) just before the stop."""
    result: dict = {}
    start = served(survivor, model), served(victim, model)

    def run():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = served(survivor, model), served(victim, model)
            victim_rows = BATCH * full_batches(delta(now[1], start[1]))
            if BATCH * full_batches(delta(now[0], start[0])) + victim_rows >= rows:
                result["victim_rows"] = victim_rows
                result["survivor_at_stop"] = now[0]
                stop()
                result["stopped"] = True
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def assert_same_labels(predictions, reference) -> None:
    assert [p.text for p in predictions] == [p.text for p in reference]
    assert [p.labels for p in predictions] == [p.labels for p in reference]


# -- without servers: the endpoint list and the give-up message ------------------------------------------
def test_urls_come_as_a_list_or_a_comma_string_and_a_target_with_a_scheme_stays_whole():
    assert normalize_urls("a:1") == ("a:1",)
    assert normalize_urls("a:1, grpc://b:2") == ("a:1", "b:2")
    assert normalize_urls(["a:1,b:2", "c:3"]) == ("a:1", "b:2", "c:3")
    assert normalize_urls("dns:///mtl-triton-headless.default.svc.cluster.local:8001") == (
        "dns:///mtl-triton-headless.default.svc.cluster.local:8001",
    )
    assert normalize_urls("ipv4:10.0.0.1:8001,10.0.0.2:8001") == ("ipv4:10.0.0.1:8001,10.0.0.2:8001",)
    for bad, message in [
        ("a:1,a:1", "given twice"),
        ("a:1,", "bad server url"),
        ("a:1,http://b:8000", "HTTP url"),
        ("dns:///", "nothing after the scheme"),
    ]:
        with pytest.raises(MTLClientError, match=message):
            normalize_urls(bad)
    with MultiTaskClient(["127.0.0.1:1", "127.0.0.1:2"]) as client:
        assert client.urls == ("127.0.0.1:1", "127.0.0.1:2") and client.url == "127.0.0.1:1,127.0.0.1:2"


def test_the_pool_goes_round_robin_takes_a_failed_endpoint_out_and_probes_it_after_its_backoff():
    now = [0.0]
    pool = EndpointPool(["a:1", "b:2", "c:3"], backoff_s=1.0, max_backoff_s=8.0, clock=lambda: now[0])
    a, b, c = pool.endpoints
    assert [pool.choose(set()) for _ in range(4)] == [(a, False), (b, False), (c, False), (a, False)]
    pool.failed(b)
    assert [pool.choose(set())[0] for _ in range(4)] == [c, a, c, a]
    assert pool.choose({a, c}) is None  # b is out until its backoff ends
    now[0] = 1.01  # past the first backoff (at most 1 s)
    assert pool.choose(set()) == (b, True)  # one caller probes it ...
    assert pool.choose({a, c}) is None  # ... and no other caller meanwhile
    pool.probed(b, healthy=False)
    assert b.failures == 2 and 1.01 + 1.0 <= b.retry_at <= 1.01 + 2.0  # a longer backoff after a failed probe
    now[0] = 3.1
    assert pool.choose({a, c}) == (b, True)
    pool.probed(b, healthy=True)
    assert not b.down and sorted(pool.choose(set())[0].url for _ in range(3)) == ["a:1", "b:2", "c:3"]
    single = EndpointPool(["only:1"])
    single.failed(single.endpoints[0])  # one endpoint is never taken out: its calls are plainly retried
    assert single.choose(set()) == (single.endpoints[0], False)


def test_attempts_fail_over_then_back_off_then_give_up_naming_every_endpoint():
    from mtl_client.endpoints import Attempts
    from mtl_client.errors import ServerError

    pool = EndpointPool(["a:1", "b:2"], clock=lambda: 0.0)
    a, b = pool.endpoints
    attempts = Attempts(pool, retries=1)
    first = attempts.next()
    assert first.endpoint is a and first.wait_s == 0
    cause = RuntimeError("refused")
    attempts.failed(a, ServerUnavailableError("a is down"), cause)
    assert attempts.next().endpoint is b  # failover at once, no retry used
    attempts.failed(b, ServerUnavailableError("b is down"), cause)
    wait = attempts.next()
    assert wait.endpoint is None and wait.wait_s > 0  # every endpoint failed: back off ...
    retry = attempts.next()
    assert retry.endpoint in (a, b)  # ... then the one back soonest, though none is due for a probe yet
    attempts.failed(retry.endpoint, ServerUnavailableError("still down"), cause)
    with pytest.raises(ServerUnavailableError) as info:
        attempts.next()
    assert str(info.value) == (
        "every endpoint is unavailable (a:1, b:2); last error: still down (gave up after 1 retries)"
    )
    assert info.value.__cause__ is cause
    # A call that finds every endpoint out tries the one back soonest at once rather than failing untried.
    fresh = Attempts(pool, retries=0)
    assert fresh.next().endpoint in (a, b)
    with pytest.raises(ServerError, match="boom"):  # not transient: no failover, no retry
        fresh.failed(a, ServerError("boom"), cause)


def test_when_every_endpoint_is_down_the_run_gives_up_naming_them(tmp_path):
    urls = [closed_port_url(), closed_port_url()]
    with (
        MultiTaskClient(urls, retries=2, timeout_s=5) as client,
        pytest.raises(ServerUnavailableError, match="gave up after 2 retries") as info,
    ):
        client.predict(["hello"])
    message = str(info.value)
    assert "every endpoint is unavailable" in message and all(url in message for url in urls)

    source = tmp_path / "in.csv"
    source.write_text("id,text\n1,hello\n")
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(source),
            "--url",
            urls[0],
            "--url",
            urls[1],
            "--retries",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert all(url in result.stderr for url in urls) and "gave up after 1 retries" in result.stderr
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["health", "--url", ",".join(urls), "--retries", "0"])
    assert result.exit_code == 1 and "no endpoint answered" in result.stderr and urls[1] in result.stderr
    result = CliRunner().invoke(main, ["health", "--url", f"{urls[0]},{urls[0]}"])
    assert result.exit_code == 2 and "given twice" in result.stderr
    result = CliRunner().invoke(main, ["health", "--url", urls[0], "--channel-arg", "lb_policy_name=round_robin"])
    assert result.exit_code == 2 and "grpc.NAME=VALUE" in result.stderr


# -- real replicas --------------------------------------------------------------------------------------
def test_a_replica_down_at_start_is_skipped_then_probed_back_and_round_robin_spreads_the_load(
    triton_server, local_triton, texts, model
):
    from mtl_serve.local import free_port

    late_port = free_port()
    late_url = f"127.0.0.1:{late_port}"
    with MultiTaskClient([triton_server.grpc_url, late_url], concurrency=CONCURRENCY) as client:
        # The second replica is not running: every row goes to the first, none is lost.
        before = served(triton_server, model)
        first = client.predict(texts[: 6 * BATCH], batch_size=BATCH)
        assert [p.text for p in first] == texts[: 6 * BATCH]
        assert batches_since(triton_server, model, before) == 6

        late = local_triton(grpc_port=late_port)
        # Once it is up, a health probe lets it back in: within a few backoffs it gets requests again.
        late_before = served(late, model)
        deadline = time.monotonic() + 60
        while batches_since(late, model, late_before) == 0:
            assert time.monotonic() < deadline, "the replica that came up never got traffic back"
            client.predict(texts[:BATCH], batch_size=BATCH)
            time.sleep(0.2)

        # Both healthy: requests alternate, so each replica gets half of them (one more at most).
        before, late_before = served(triton_server, model), served(late, model)
        predictions = client.predict(texts[:320], batch_size=BATCH)
        a, b = batches_since(triton_server, model, before), batches_since(late, model, late_before)
        assert a + b == 320 // BATCH and abs(a - b) <= 1, (a, b)
    with MultiTaskClient(triton_server.grpc_url) as alone:
        assert_same_labels(predictions, alone.predict(texts[:320], batch_size=BATCH))

    async def run_async():
        async with AsyncMultiTaskClient(f"{triton_server.grpc_url},{late_url}", concurrency=CONCURRENCY) as aclient:
            return await aclient.predict(texts[:192], batch_size=BATCH)

    before, late_before = served(triton_server, model), served(late, model)
    async_predictions = asyncio.run(run_async())
    a, b = batches_since(triton_server, model, before), batches_since(late, model, late_before)
    assert a + b == 192 // BATCH and abs(a - b) <= 1, (a, b)
    assert_same_labels(async_predictions, predictions[:192])

    # One gRPC target with both addresses (what DNS gives for a headless Service): the default pick_first
    # policy sends everything to one replica, round_robin spreads it.
    target = f"ipv4:{triton_server.grpc_url},{late_url}"
    for channel_args, both in [(None, False), ({"grpc.lb_policy_name": "round_robin"}, True)]:
        before, late_before = served(triton_server, model), served(late, model)
        with MultiTaskClient(target, concurrency=CONCURRENCY, channel_args=channel_args) as client:
            assert_same_labels(client.predict(texts[:320], batch_size=BATCH), predictions[:320])
        a, b = batches_since(triton_server, model, before), batches_since(late, model, late_before)
        assert a + b == 320 // BATCH
        assert (a > 0 and b > 0) == both, (channel_args, a, b)


def test_sdk_run_survives_a_replica_stopped_in_the_middle(triton_server, local_triton, texts, model):
    victim = local_triton()
    start = served(triton_server, model)
    with MultiTaskClient([victim.grpc_url, triton_server.grpc_url], concurrency=CONCURRENCY) as client:
        client.get_contract()
        thread, stop = stop_when_served(triton_server, victim, model, ROWS // 5, victim.stop)
        predictions = client.predict(texts, batch_size=BATCH)
        thread.join(timeout=120)
    assert stop.get("stopped"), "the replica was not stopped during the run"
    # Every row exactly once, in input order.
    assert [p.text for p in predictions] == texts
    survivor_rows = BATCH * batches_since(triton_server, model, start)
    # The survivor served every row the stopped replica had not answered (less what was in flight then).
    in_flight = 2 * CONCURRENCY * BATCH
    assert survivor_rows >= ROWS - stop["victim_rows"] - in_flight, (survivor_rows, stop)
    assert 0 < stop["victim_rows"] < ROWS // 2
    assert batches_since(triton_server, model, stop["survivor_at_stop"]) > 0
    with MultiTaskClient(triton_server.grpc_url) as alone:
        for part in (slice(0, 96), slice(ROWS - 96, ROWS)):
            assert_same_labels(predictions[part], alone.predict(texts[part], batch_size=BATCH))


def test_cli_run_survives_a_replica_killed_in_the_middle(
    triton_server, local_triton, texts, model, test_config, tmp_path
):
    victim = local_triton(watchdog=False)  # a dead Triton stays dead
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows((f"r{i}", text) for i, text in enumerate(texts))
    start = served(triton_server, model)
    thread, stop = stop_when_served(
        triton_server, victim, model, ROWS // 5, lambda: os.killpg(victim.pid, signal.SIGKILL)
    )
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(source),
            "--url",
            f"{victim.grpc_url},{triton_server.grpc_url}",
            "--out-dir",
            str(tmp_path / "out"),
            "--batch-size",
            str(BATCH),
            "--concurrency",
            str(CONCURRENCY),
        ],
    )
    thread.join(timeout=120)
    assert result.exit_code == 0, result.output
    assert stop.get("stopped"), "the replica was not killed during the run"
    template = test_config.serving.output_filename
    for task in test_config.tasks:
        with open(tmp_path / "out" / template.replace("{task}", task.name), newline="", encoding="utf-8") as handle:
            written = list(csv.DictReader(handle))
        assert [(r["id"], r["text"]) for r in written] == [(f"r{i}", t) for i, t in enumerate(texts)]
        assert {r["label"] for r in written} <= set(task.labels)
    survivor_rows = BATCH * batches_since(triton_server, model, start)
    in_flight = 2 * CONCURRENCY * BATCH
    assert survivor_rows >= ROWS - stop["victim_rows"] - in_flight, (survivor_rows, stop)
    assert 0 < stop["victim_rows"] < ROWS // 2
    assert batches_since(triton_server, model, stop["survivor_at_stop"]) > 0


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def test_a_replica_serving_another_contract_is_an_error_naming_it(
    triton_server, local_triton, built_repository, test_config, tmp_path, texts, model
):
    other = tmp_path / "other-repository"
    shutil.copytree(built_repository, other, copy_function=_link_or_copy)
    config = other / model / "config.pbtxt"
    task = test_config.tasks[-1]
    renamed = f"{task.labels[0]}_v2"
    pbtxt = config.read_text()
    assert f'\\"{task.labels[0]}\\"' in pbtxt
    config.unlink()  # a hard link: write a new file, not into the shared one
    config.write_text(pbtxt.replace(f'\\"{task.labels[0]}\\"', f'\\"{renamed}\\"', 1))
    different = local_triton(repository=other)
    before = served(triton_server, model), served(different, model)
    for urls in ([triton_server.grpc_url, different.grpc_url], [different.grpc_url, triton_server.grpc_url]):
        with MultiTaskClient(urls) as client, pytest.raises(ModelContractError) as info:
            client.predict(texts[:BATCH], batch_size=BATCH)
        message = str(info.value)
        assert f"replica {urls[1]} serves a different model contract than {urls[0]}" in message
        assert renamed in message and "tasks" in message
    # Nothing was scored on either.
    assert batches_since(triton_server, model, before[0]) == batches_since(different, model, before[1]) == 0
