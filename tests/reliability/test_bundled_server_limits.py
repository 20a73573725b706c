"""What the bundled Triton 2.51 does NOT survive, or gets wrong, on its own ports: the reasons for
mtl_serve.guard and mtl_serve.grpc_guard.

The first tests start a Triton without the guards, send one request, and expect the whole server to
die with SIGSEGV. The others send, to one unguarded Triton, requests it resets without an answer, a
shape it answers 200 although no such tensor can exist, and gRPC requests whose memory it keeps. If a
newer server handles any of them, its test fails: then that part of the guards may be dropped
(docs/reliability.md).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time

import grpc
import pytest
from rel_helpers import COUNTS, MIB, mib, server_memory
from tritonclient.grpc import service_pb2

pytestmark = pytest.mark.reliability

FORM_BODY = ("application/x-www-form-urlencoded", b"x=" + b"a" * (5 * 1024 * 1024))
DEEP_JSON = ("application/json", b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}")


@pytest.mark.parametrize("content_type, body", [FORM_BODY, DEEP_JSON], ids=["5MB-form-body", "deep-json"])
def test_unguarded_triton_dies_on(local_triton, test_config, content_type, body):
    server = local_triton(http_guard=False, grpc_guard=False, watchdog=False, exit_timeout_s=2)
    head = (
        f"POST /v2/models/{test_config.serving.model_name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
    )
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
    crashed = server.process.returncode == -signal.SIGSEGV or "Signal (11) received." in server.log_text()
    assert crashed, (server.process.returncode, server.log_text()[-2000:])


@pytest.fixture(scope="module")
def unguarded(built_repository, tmp_path_factory):
    """One Triton with its own HTTP and gRPC ports exposed (no guard, no watchdog), for requests it survives."""
    from mtl_serve import LocalTriton

    log = tmp_path_factory.mktemp("unguarded") / "tritonserver.log"
    with LocalTriton(
        built_repository, 0, 0, 0, log_file=log, http_guard=False, grpc_guard=False, watchdog=False, exit_timeout_s=2
    ) as server:
        yield server


def _exchange(server, request: bytes) -> bytes:
    COUNTS.inputs += 1
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
    except ConnectionResetError:
        pass
    return answer


# Triton 2.51 accepts a request target of 8,189 bytes and a header line of 8,191, and resets beyond.
RESET = {
    "60 KB header": b"GET /v2/health/ready HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n",
    "9 KB header name": b"GET /v2/health/ready HTTP/1.1\r\nHost: h\r\n" + b"X" * 9_000 + b": 1\r\n\r\n",
    "20 KB path": b"GET /v2/health/ready?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("case", list(RESET))
def test_unguarded_triton_resets_without_an_answer(unguarded, case):
    assert _exchange(unguarded, RESET[case]) == b"", "Triton answered: the guard's limit may be relaxed"
    assert _exchange(unguarded, b"GET /v2/health/ready HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200"
    )


def test_unguarded_triton_answers_an_impossible_shape(unguarded, test_config):
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [2**63, 1], "datatype": "BYTES", "data": ["a"]}]}).encode()
    answer = _exchange(
        unguarded,
        (
            f"POST /v2/models/{test_config.serving.model_name}/infer HTTP/1.1\r\nHost: h\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 200"), "Triton refused it: the guard's shape check may be dropped"


def test_unguarded_triton_keeps_the_memory_of_large_grpc_requests(unguarded, test_config):
    # 256 rows of 1 MiB for an input the model does not have: refused, yet what Triton allocated stays.
    request = service_pb2.ModelInferRequest(model_name=test_config.serving.model_name)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "NOT_AN_INPUT", "BYTES"
    tensor.shape.extend([256, 1])
    request.raw_input_contents.append((struct.pack("<I", MIB) + b"a" * MIB) * 256)
    before = server_memory(unguarded)
    with grpc.insecure_channel(unguarded.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        for _ in range(2):
            COUNTS.inputs += 1
            with pytest.raises(grpc.RpcError) as refused:
                infer(request, timeout=300)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(3)
    after = server_memory(unguarded)
    COUNTS.notes.append(
        f"unguarded Triton, two refused 256 MiB gRPC requests: {mib(before)} before, {mib(after)} after"
    )
    assert after["tritonserver"] - before["tritonserver"] > 256 * MIB, (mib(before), mib(after))
