"""What the bundled Triton 2.51 does NOT survive on its own HTTP port: the reason for mtl_serve.guard.

These tests start a Triton without the guard (http_guard=False), send one request, and expect the
whole server to die with SIGSEGV. If a newer server survives them, these tests fail: then the guard
may be dropped (docs/reliability.md).
"""
from __future__ import annotations

import signal
import socket
import time

import pytest
from mtl_serve import LocalTriton
from rel_helpers import COUNTS

pytestmark = pytest.mark.reliability

FORM_BODY = ("application/x-www-form-urlencoded", b"x=" + b"a" * (5 * 1024 * 1024))
DEEP_JSON = ("application/json", b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}")


@pytest.mark.parametrize("content_type, body", [FORM_BODY, DEEP_JSON], ids=["5MB-form-body", "deep-json"])
def test_unguarded_triton_dies_on(built_repository, tmp_path, content_type, body):
    log = tmp_path / "triton.log"
    with LocalTriton(built_repository, 0, 0, 0, log_file=log, http_guard=False, watchdog=False,
                     exit_timeout_s=2) as server:
        head = (f"POST /v2/models/multitask/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: {content_type}\r\nConnection: close\r\n\r\n")
        COUNTS.inputs += 1
        COUNTS.faults += 1
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            try:
                sock.sendall(head.encode() + body)
                sock.recv(1024)
            except OSError:
                pass
        deadline = time.monotonic() + 20
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.process.poll() is not None, "Triton survived: the guard may no longer be needed"
        # A stack overflow leaves no room for Triton's own signal handler, so it may not log "Signal (11)".
        crashed = server.process.returncode == -signal.SIGSEGV or "Signal (11) received." in log.read_text()
        assert crashed, (server.process.returncode, log.read_text()[-2000:])
