"""A python-backend stub that dies: what Triton 2.51 does, and what the watchdog in LocalTriton adds.

Measured here: after SIGKILL of the stub, Triton 2.51 keeps the model READY (HTTP and gRPC) and answers
every inference with INTERNAL "Stub process 'multitask_0_0' is not healthy."; it does not restart the
stub. The watchdog sees the stub's PID die and restarts Triton on the same ports.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from mtl_serve import LocalTriton
from mtl_serve.local import free_port, group_members
from rel_helpers import BIN, COUNTS, INSTANCES

pytestmark = pytest.mark.reliability


def _infer(client: grpcclient.InferenceServerClient) -> str:
    COUNTS.inputs += 1
    tensor = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"Shares rallied"], [b"A great album"]], dtype=object))
    try:
        result = client.infer("multitask", [tensor], client_timeout=20)
    except Exception as exc:  # noqa: BLE001 - any failure is an observation here
        return f"error: {exc}"
    return "ok" if result.as_numpy("topic").shape == (2, 3) else "wrong shape"


def _model_ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return bool(client.is_model_ready("multitask", client_timeout=2))
    except Exception:  # noqa: BLE001 - unreachable counts as not ready
        return False


def _kill_stubs(server: LocalTriton) -> list[int]:
    """SIGKILL every instance's stub, so that no healthy instance is left to answer."""
    stubs = server.stub_pids()
    assert len(stubs) == INSTANCES, stubs
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
        COUNTS.faults += 1
    return stubs


def test_triton_2_51_alone_leaves_a_dead_stub_model_ready(built_repository, tmp_path):
    # watchdog off: this records the bundled server's own behaviour (the reason for the watchdog).
    with LocalTriton(built_repository, 0, 0, 0, log_file=tmp_path / "triton.log", watchdog=False,
                     exit_timeout_s=2) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert _infer(client) == "ok"
        _kill_stubs(server)
        time.sleep(3)  # far longer than any restart the python backend might do on its own
        assert server.is_ready("multitask") and _model_ready(client)
        answer = _infer(client)
        assert re.search(r"Stub process 'multitask_0_\d+' is not healthy", answer), answer
        assert server.stub_pids() == []


def test_watchdog_restarts_triton_on_the_same_ports_then_gives_up(built_repository, tmp_path):
    events = []
    server = LocalTriton(built_repository, 0, 0, 0, log_file=tmp_path / "triton.log", max_restarts=1,
                         on_event=events.append)
    with server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        ports = (server.grpc_port, server.http_port, server.metrics_port)
        assert _infer(client) == "ok"
        old_stubs = _kill_stubs(server)
        killed = time.monotonic()
        # Readiness must mean "can infer": after the watchdog's first look (0.5 s), the model is either
        # not ready (Triton restarting) or ready and answering.
        broken_but_ready = []
        while time.monotonic() - killed < 90:
            ready, answer = _model_ready(client), _infer(client)
            if ready and answer != "ok" and time.monotonic() - killed > 1.5:
                broken_but_ready.append(answer)
            if ready and answer == "ok":
                break
            time.sleep(0.1)
        recovered_after = time.monotonic() - killed
        assert answer == "ok", (answer, events)
        assert not broken_but_ready, broken_but_ready
        assert server.restarts == 1 and (server.grpc_port, server.http_port, server.metrics_port) == ports
        assert len(server.stub_pids()) == INSTANCES and not set(old_stubs) & set(server.stub_pids())
        assert server.is_ready("multitask")
        assert any("died" in e for e in events) and any("restarted" in e for e in events), events
        COUNTS.notes.append(f"stub SIGKILL: model serving again {recovered_after:.1f}s later (watchdog restart)")

        # A second death within the window: max_restarts=1 is spent, so it stops Triton and says why.
        _kill_stubs(server)
        deadline = time.monotonic() + 30
        while server.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.failure and "1 of 1 allowed restart(s)" in server.failure, events
        assert server.process.poll() is not None and group_members(server.pid) == []
        assert not server.is_ready("multitask") and not server.is_ready()


def test_mtl_serve_exits_1_when_the_watchdog_gives_up(built_repository, tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    log = tmp_path / "serve.out"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [str(BIN / "mtl-serve"), "--model-repository", str(built_repository), "--grpc-port", ports[0],
             "--http-port", ports[1], "--metrics-port", ports[2], "--log-file", str(tmp_path / "triton.log"),
             "--max-restarts", "0"], stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "(Ctrl-C to stop)" not in log.read_text() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serve.poll() is None, log.read_text()
        stubs = [pid for pid in _descendants(serve.pid) if "triton_python_backend_stub" in _cmdline(pid)]
        assert len(stubs) == INSTANCES, log.read_text()
        os.kill(stubs[0], signal.SIGKILL)  # one instance's stub is enough: the watchdog may not restart
        COUNTS.faults += 1
        assert serve.wait(timeout=60) == 1, log.read_text()
        text = log.read_text()
        assert "mtl-serve: error: the python-backend stub died, and 0 of 0 allowed restart(s)" in text, text
    finally:
        if serve.poll() is None:
            serve.kill()


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        found += children
        frontier += children
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
