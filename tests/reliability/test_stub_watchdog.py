"""A python-backend stub that dies or hangs, and a Triton that crashes: what Triton 2.51 does, and what
the watchdog in LocalTriton adds.

Measured here: after SIGKILL or SIGSTOP of the stubs, Triton 2.51 keeps the model READY (HTTP and gRPC)
and answers their requests with INTERNAL "Stub process 'multitask_0_0' is not healthy."; it restarts
neither, and after a SIGCONT it may abort. The watchdog sees a stub die (PID), stop (state T on two
looks) or a canary inference go unanswered while the stubs use no CPU, makes readiness say not-ready at
once, and restarts Triton on the same ports; it restarts a crashed Triton too, and removes the /dev/shm
regions the old one left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rel_helpers import BIN, COUNTS, wait_for

from mtl_serve import free_port, group_members
from mtl_serve.procs import SHM_FOLDER, cmdline, shm_regions

pytestmark = pytest.mark.reliability
STUB_FAILURE = r"Stub process '\w+' is not healthy"


def _infer(client: grpcclient.InferenceServerClient, model: str, rows: int = 2, timeout_s: float = 20) -> str:
    COUNTS.inputs += 1
    tensor = grpcclient.InferInput("TEXT", [rows, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"Shares rallied after the results"]] * rows, dtype=object))
    try:
        result = client.infer(model, [tensor], client_timeout=timeout_s)
    except Exception as exc:  # any failure is an observation here
        return f"error: {exc}"
    return "ok" if result.as_numpy("TRUNCATED").shape == (rows, 1) else "wrong shape"


def _model_ready(client: grpcclient.InferenceServerClient, model: str) -> bool:
    COUNTS.inputs += 1
    try:
        return bool(client.is_model_ready(model, client_timeout=2))
    except Exception:  # unreachable counts as not ready
        return False


def _http_ready(http_url: str, model: str) -> bool:
    COUNTS.inputs += 1
    try:
        with urllib.request.urlopen(f"{http_url}/v2/models/{model}/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_stubs(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)
        COUNTS.faults += 1


def _existing(regions: set[str]) -> set[str]:
    return {name for name in regions if (SHM_FOLDER / name).exists()}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_triton_2_51_alone_keeps_a_model_ready_whose_stubs_failed(local_triton, test_config, sig):
    # watchdog off: this records the bundled server's own behaviour (the reason for the watchdog).
    model = test_config.serving.model_name
    server = local_triton(watchdog=False, exit_timeout_s=2)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert _infer(client, model) == "ok"
        stubs = server.stub_pids()
        assert len(stubs) == test_config.serving.instance_count, stubs
        _signal_stubs(stubs, sig)  # every instance, so that no healthy one is left to answer
        time.sleep(3)  # far longer than any restart the python backend might do on its own
        answers = [_infer(client, model) for _ in range(3)]
        assert all(re.search(STUB_FAILURE, a) for a in answers), answers
        assert server.is_ready(model) and _model_ready(client, model)
        if sig == signal.SIGKILL:
            assert server.stub_pids() == []
        else:
            assert sorted(server.stub_pids()) == sorted(stubs)
            _signal_stubs(stubs, signal.SIGKILL)  # a SIGCONT may abort Triton; end them for a quick stop


def test_watchdog_restarts_triton_on_the_same_ports_then_gives_up(local_triton, test_config):
    events = []
    model, instances = test_config.serving.model_name, test_config.serving.instance_count
    server = local_triton(max_restarts=1, on_event=events.append)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        ports = (server.grpc_port, server.http_port, server.metrics_port)
        assert _infer(client, model) == "ok"
        first_regions = server.shm_regions
        assert len(_existing(first_regions)) == instances, first_regions
        old_stubs = server.stub_pids()
        _signal_stubs(old_stubs, signal.SIGKILL)
        killed = time.monotonic()
        # Readiness must mean "can infer": after the watchdog's first look (0.5 s), the model is either
        # not ready (Triton restarting) or ready and answering.
        broken_but_ready = []
        while time.monotonic() - killed < 120:
            ready, answer = _model_ready(client, model), _infer(client, model)
            if ready and answer != "ok" and time.monotonic() - killed > 1.5:
                broken_but_ready.append(answer)
            if ready and answer == "ok":
                break
            time.sleep(0.1)
        assert answer == "ok", (answer, events)
        assert not broken_but_ready, broken_but_ready
        assert server.restarts == 1 and (server.grpc_port, server.http_port, server.metrics_port) == ports
        assert len(server.stub_pids()) == instances and not set(old_stubs) & set(server.stub_pids())
        assert server.is_ready(model)
        assert any("died" in e for e in events) and any("restarted" in e for e in events), events
        # The dead stubs' shared memory went with the old Triton; the new one has its own.
        assert not _existing(first_regions), _existing(first_regions)
        second_regions = server.shm_regions
        assert len(_existing(second_regions)) == instances and not second_regions & first_regions
        recovery = server.recoveries[-1]
        COUNTS.notes.append(
            f"stub SIGKILL, idle server: seen {recovery.detected_at - killed:.1f}s after the kill, "
            f"serving again {recovery.ready_at - killed:.1f}s after it (watchdog restart)"
        )

        # A second death within the window: max_restarts=1 is spent, so it stops Triton and says why.
        _signal_stubs(server.stub_pids(), signal.SIGKILL)
        assert wait_for(lambda: server.failure is not None, 30), events
        assert "1 of 1 allowed restart(s)" in server.failure, server.failure
        assert server.process.poll() is not None and group_members(server.pid) == []
        assert not server.is_ready(model) and not server.is_ready()
        assert not _existing(second_regions), _existing(second_regions)


def test_watchdog_restarts_a_crashed_triton_and_removes_its_shared_memory(local_triton, test_config):
    model = test_config.serving.model_name
    server = local_triton()
    regions = server.shm_regions
    assert len(_existing(regions)) == test_config.serving.instance_count
    old_pid = server.pid
    crashed = time.monotonic()
    os.kill(old_pid, signal.SIGSEGV)  # what it does on its own under traffic with a stopped stub
    COUNTS.faults += 1
    assert wait_for(lambda: server.recoveries and server.recoveries[-1].ready_at or server.failure, 120), server.events
    assert server.failure is None and server.restarts == 1, server.events
    assert server.recoveries[-1].cause.startswith("tritonserver exited with code"), server.recoveries
    assert server.pid != old_pid and not _existing(regions), _existing(regions)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert _infer(client, model) == "ok"
    recovery = server.recoveries[-1]
    COUNTS.notes.append(
        f"tritonserver SIGSEGV: exit seen {recovery.detected_at - crashed:.1f}s later, serving again "
        f"after {recovery.ready_at - crashed:.1f}s (watchdog restart)"
    )


def _start_mtl_serve(repository: Path, tmp_path: Path, *options: str) -> tuple[subprocess.Popen, list[str], Path]:
    ports = [str(free_port()) for _ in range(3)]
    out = tmp_path / "serve.out"
    with out.open("w") as handle:
        serve = subprocess.Popen(
            [
                str(BIN / "mtl-serve"),
                "--model-repository",
                str(repository),
                "--grpc-port",
                ports[0],
                "--http-port",
                ports[1],
                "--metrics-port",
                ports[2],
                "--log-file",
                str(tmp_path / "triton.log"),
                *options,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    COUNTS.inputs += 1
    assert wait_for(lambda: "(Ctrl-C to stop)" in out.read_text() or serve.poll() is not None, 240), out.read_text()
    assert serve.poll() is None, out.read_text()
    return serve, ports, out


def _stop(serve: subprocess.Popen) -> None:
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()


class Traffic:
    """Client threads sending `rows`-row requests until stopped, backing off briefly after an error."""

    def __init__(self, url: str, model: str, threads: int = 2, rows: int = 70):
        self.url, self.model, self.rows = url, model, rows
        self.results: list[tuple[float, str]] = []  # (time answered, "ok" or the error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                answer = _infer(client, self.model, self.rows, timeout_s=60)
                self.results.append((time.monotonic(), answer))
                if answer in ("ok", "wrong shape"):  # an answer: its row count is checked
                    COUNTS.rows(self.rows, self.rows if answer == "ok" else 0)
                if answer != "ok":
                    time.sleep(0.2)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_under_traffic_a_failed_stub_is_seen_at_once_and_triton_recovers(built_repository, test_config, tmp_path, sig):
    """The issue's repro: 2 clients sending 70-row requests; one stub SIGKILLed, or SIGSTOPped for 20 s then
    SIGCONTed. Readiness (gRPC and HTTP) stops saying ready once the watchdog sees it, mtl-serve keeps
    running, clients see only transient errors, and the old Triton's shared memory is gone."""
    model = test_config.serving.model_name
    serve, ports, out = _start_mtl_serve(built_repository, tmp_path)
    grpc_url, http_url = f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    try:
        group = next(pid for pid in _children(serve.pid) if "tritonserver" in cmdline(pid))
        stubs = [pid for pid in group_members(group) if "triton_python_backend_stub" in cmdline(pid)]
        regions = shm_regions(group_members(group))
        assert len(stubs) == test_config.serving.instance_count and len(regions) == len(stubs), (stubs, regions)
        samples = []  # (seconds after the fault, gRPC ready, HTTP ready, sampler's own inference)
        with Traffic(grpc_url, model) as traffic, grpcclient.InferenceServerClient(grpc_url) as client:
            assert wait_for(lambda: sum(r == "ok" for _, r in traffic.results) >= 2, 120), traffic.results[-3:]
            fault = time.monotonic()
            _signal_stubs(stubs[:1], sig)
            continued = sig != signal.SIGSTOP
            detected = recovered = health_exit = None
            while time.monotonic() - fault < 180 and recovered is None:
                now = time.monotonic() - fault
                grpc_ready, http_ready = _model_ready(client, model), _http_ready(http_url, model)
                answer = _infer(client, model) if grpc_ready and http_ready else None
                samples.append((now, grpc_ready, http_ready, answer))
                if detected is None and not (grpc_ready and http_ready):
                    detected = now
                    COUNTS.inputs += 1
                    health_exit = subprocess.run(
                        [str(BIN / "mtl-client"), "health", "--url", grpc_url],
                        capture_output=True,
                        text=True,
                        timeout=60,
                    ).returncode
                if detected is not None and answer == "ok":
                    recovered = now
                if not continued and now > 20:
                    continued = True
                    with contextlib.suppress(ProcessLookupError):  # the watchdog's restart may have ended it
                        os.kill(stubs[0], signal.SIGCONT)
                time.sleep(0.2)
            settled = time.monotonic()
            assert wait_for(lambda: any(t > settled and r == "ok" for t, r in traffic.results), 60), traffic.results[
                -3:
            ]
        assert serve.poll() is None, out.read_text()
        assert detected is not None and recovered is not None, (samples[-5:], out.read_text())
        broken_but_ready = [s for s in samples if s[0] > detected and s[3] not in (None, "ok")]
        assert not broken_but_ready, broken_but_ready
        assert health_exit == 1, "mtl-client health said healthy while Triton was being restarted"
        after_fault = [r for t, r in traffic.results if t > fault]
        lasting = [r for r in after_fault if r != "ok" and "StatusCode.UNAVAILABLE" not in r]
        assert not lasting, lasting[:3]  # every failure a client saw is one it may retry
        assert not _existing(regions), _existing(regions)
        text = out.read_text()
        assert "restarting Triton" in text and "Triton restarted" in text, text
        failed = sum(r != "ok" for r in after_fault)
        COUNTS.notes.append(
            f"stub {signal.Signals(sig).name} under 2 x 70-row traffic: readiness false {detected:.1f}s after the "
            f"fault, serving again after {recovered:.1f}s; {failed} of {len(after_fault)} client requests got "
            "UNAVAILABLE meanwhile (none INTERNAL); mtl-serve kept running"
        )
    finally:
        _stop(serve)


def test_mtl_serve_exits_1_when_the_watchdog_gives_up(built_repository, tmp_path):
    serve, _, out = _start_mtl_serve(built_repository, tmp_path, "--max-restarts", "0")
    try:
        stubs = [pid for pid in _descendants(serve.pid) if "triton_python_backend_stub" in cmdline(pid)]
        assert stubs, out.read_text()
        _signal_stubs(stubs[:1], signal.SIGKILL)  # one instance's stub is enough: the watchdog may not restart
        assert serve.wait(timeout=60) == 1, out.read_text()
        text = out.read_text()
        assert "mtl-serve: error: the python-backend stub died, and 0 of 0 allowed restart(s)" in text, text
    finally:
        _stop(serve)


# A test model whose only instance blocks (without CPU) on "hang", or computes for SPIN_S seconds on "spin".
SLEEPER_CONFIG = """name: "sleeper"
backend: "python"
max_batch_size: 8
input { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] }
instance_group { count: 1 kind: KIND_CPU }
"""
SLEEPER_MODEL = """import time

import numpy as np
import triton_python_backend_utils as pb_utils

SPIN_S = 6.0


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            for text in texts:
                if text == b"hang":
                    time.sleep(3600)
                if text == b"spin":
                    end = time.monotonic() + SPIN_S
                    while time.monotonic() < end:
                        pass
            out = pb_utils.Tensor("OUT", np.zeros((len(texts), 1), np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""


def _sleeper_repository(folder: Path) -> Path:
    (folder / "sleeper" / "1").mkdir(parents=True)
    (folder / "sleeper" / "config.pbtxt").write_text(SLEEPER_CONFIG)
    (folder / "sleeper" / "1" / "model.py").write_text(SLEEPER_MODEL)
    return folder


def _send_text(url: str, text: bytes, timeout_s: float) -> threading.Thread:
    def send():
        with grpcclient.InferenceServerClient(url) as client:
            tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text]], dtype=object))
            with contextlib.suppress(Exception):  # the hung request ends with the old Triton
                client.infer("sleeper", [tensor], client_timeout=timeout_s)

    COUNTS.inputs += 1
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_canary_tells_a_hung_stub_from_a_busy_one(local_triton, tmp_path):
    # Deadline 3 s: the 6 s "spin" outlasts two canaries, but the stub uses CPU all along.
    server = local_triton(_sleeper_repository(tmp_path / "repo"), probe_interval_s=0.5, probe_deadline_s=3.0)
    busy = _send_text(server.grpc_url, b"spin", 60)
    busy.join(timeout=60)
    assert not busy.is_alive() and server.restarts == 0 and not server.recoveries, server.events
    assert server.canaries_late >= 1, (server.canaries_sent, server.canaries_late)
    hung_at = time.monotonic()
    _send_text(server.grpc_url, b"hang", 120)  # blocks the only instance, as a deadlock would
    COUNTS.faults += 1
    assert wait_for(lambda: server.recoveries and server.recoveries[-1].ready_at or server.failure, 120), server.events
    recovery = server.recoveries[-1]
    assert server.failure is None and recovery.cause == "a python-backend stub stopped answering", server.events
    assert any("canary inference of model sleeper got no answer" in e for e in server.events), server.events
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"fine"]], dtype=object))
        COUNTS.inputs += 1
        assert client.infer("sleeper", [tensor], client_timeout=20).as_numpy("OUT").shape == (1, 1)
    COUNTS.notes.append(
        f"hung stub (blocked, not stopped; canary deadline 3 s): seen "
        f"{recovery.detected_at - hung_at:.1f}s after the hang, serving again after "
        f"{recovery.ready_at - hung_at:.1f}s"
    )


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        found += children
        frontier += children
    return found
