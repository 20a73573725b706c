"""Hostile requests against the real server: each gets an error (or its defined answer), and the same
server answers the next valid request, with the same Triton process and the same stub (no restart).

Raw payloads are built by hand: gRPC ModelInferRequest with raw_input_contents, and HTTP's binary
extension (JSON header + Inference-Header-Content-Length + raw bytes). HTTP goes through the guard
in front of Triton (mtl_serve.guard), as every client's HTTP does.
"""
from __future__ import annotations

import gzip
import json
import socket
import struct

import grpc
import numpy as np
import pytest
import urllib.error
import urllib.request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import COUNTS, INSTANCES
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.reliability
MODEL = "multitask"
MAX_BATCH = 256
TEN_MB = 10 * 1024 * 1024


def element(data: bytes) -> bytes:
    """One BYTES tensor element as Triton serialises it: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + data


def elements(*items: bytes) -> bytes:
    return b"".join(element(i) for i in items)


@pytest.fixture(scope="module")
def stub(rel_server):
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(rel_server.grpc_url, options=options) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def same_process(rel_server):
    """Fails the test if Triton or its stub changed while it ran (a crash, or a watchdog restart)."""
    before = (rel_server.pid, sorted(rel_server.stub_pids()), rel_server.restarts)
    yield
    assert (rel_server.pid, sorted(rel_server.stub_pids()), rel_server.restarts) == before, rel_server.events


def grpc_infer(stub, raw: list[bytes], shape, datatype="BYTES", name="TEXT", outputs=()):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    for output in outputs:
        request.outputs.add().name = output
    request.raw_input_contents.extend(raw)
    COUNTS.inputs += 1
    try:
        response = stub.ModelInfer(request, timeout=120)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, {o.name: (list(o.shape), raw) for o, raw in zip(response.outputs, response.raw_output_contents)}


def http_post(server, body: bytes, headers: dict[str, str], path=f"/v2/models/{MODEL}/infer"):
    COUNTS.inputs += 1
    request = urllib.request.Request(f"{server.http_url}{path}", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        payload = error.read()
        try:
            return error.code, json.loads(payload)
        except ValueError:
            return error.code, {"error": payload.decode(errors="replace")}


def http_json(server, texts=None, shape=None, datatype="BYTES", name="TEXT", outputs=None, content_type="application/json"):
    body = {"inputs": [{"name": name, "shape": shape if shape is not None else [len(texts), 1],
                        "datatype": datatype, "data": texts}]}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return http_post(server, json.dumps(body).encode(), {"Content-Type": content_type})


def http_binary(server, raw: bytes, shape, header_length: int | None = None, binary_size: int | None = None):
    header = json.dumps({"inputs": [{"name": "TEXT", "shape": shape, "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw) if binary_size is None else binary_size}}],
                         "outputs": [{"name": "topic", "parameters": {"binary_data": False}}]}).encode()
    length = len(header) if header_length is None else header_length
    return http_post(server, header + raw, {"Inference-Header-Content-Length": str(length),
                                            "Content-Type": "application/octet-stream"})


def assert_serving(server, stub) -> None:
    """The next valid request succeeds, over gRPC and over HTTP."""
    code, outputs = grpc_infer(stub, [elements(b"The bank's shares rallied", b"A joyful new album")], [2, 1])
    assert code == grpc.StatusCode.OK, outputs
    assert outputs["topic"][0] == [2, 3] and outputs["TRUNCATED"][0] == [2, 1]
    status, body = http_json(server, ["The phone update is great"])
    assert status == 200, body
    assert {o["name"]: o["shape"] for o in body["outputs"]}["topic"] == [1, 3]


# -- gRPC, raw_input_contents built by hand ------------------------------------------------------------
GRPC_CASES = {
    "wrong dtype": (dict(raw=[b"\0\0\0\0"], shape=[1, 1], datatype="FP32"), "INVALID_ARGUMENT", "data-type"),
    "wrong shape": (dict(raw=[elements(b"a", b"b")], shape=[1, 2]), "INVALID_ARGUMENT", "unexpected shape"),
    "no batch dimension": (dict(raw=[elements(b"a", b"b")], shape=[2]), "INVALID_ARGUMENT", "unexpected shape"),
    "empty batch": (dict(raw=[b""], shape=[0, 1]), "INVALID_ARGUMENT", ""),
    "batch above max_batch_size": (dict(raw=[elements(*[b"x"] * (MAX_BATCH + 1))], shape=[MAX_BATCH + 1, 1]),
                                   "INVALID_ARGUMENT", "batch-size must be <= 256"),
    "invalid UTF-8 in row 1": (dict(raw=[elements(b"fine", b"\xc3\x28 bad", b"fine")], shape=[3, 1]),
                               "INVALID_ARGUMENT", "row 1: invalid UTF-8"),
    "empty text": (dict(raw=[elements(b"   ")], shape=[1, 1]), "INVALID_ARGUMENT", "row 0: empty text"),
    "length prefix past the end": (dict(raw=[struct.pack("<I", 500) + b"hello"], shape=[1, 1]),
                                   "INVALID_ARGUMENT", "incomplete string data"),
    "length prefix 0xFFFFFFFF": (dict(raw=[struct.pack("<I", 0xFFFFFFFF) + b"hello"], shape=[1, 1]),
                                 "INVALID_ARGUMENT", "incomplete string data"),
    "truncated length prefix": (dict(raw=[b"\x05\x00"], shape=[1, 1]), "INVALID_ARGUMENT", "length indicator"),
    "bytes after the last element": (dict(raw=[struct.pack("<I", 2) + b"hello"], shape=[1, 1]),
                                     "INVALID_ARGUMENT", "length indicator"),
    "more elements than the shape": (dict(raw=[elements(b"a", b"b")], shape=[1, 1]), "INVALID_ARGUMENT",
                                     "string elements"),
    "fewer elements than the shape": (dict(raw=[elements(b"a")], shape=[3, 1]), "INVALID_ARGUMENT", "string elements"),
    "empty raw content": (dict(raw=[b""], shape=[1, 1]), "INVALID_ARGUMENT", "string elements"),
    "no raw content": (dict(raw=[], shape=[1, 1]), "INVALID_ARGUMENT", "unable to find data"),
    "unknown input name": (dict(raw=[elements(b"a")], shape=[1, 1], name="NOPE"), "INVALID_ARGUMENT", "NOPE"),
    "unknown output": (dict(raw=[elements(b"a")], shape=[1, 1], outputs=["nope"]), "INVALID_ARGUMENT",
                       "unexpected inference output 'nope'"),
    "10 MB of invalid UTF-8": (dict(raw=[element(b"\xff" * TEN_MB)], shape=[1, 1]), "INVALID_ARGUMENT",
                               "row 0: invalid UTF-8"),
}


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_grpc_hostile_request_gets_an_error_and_the_server_keeps_serving(rel_server, stub, same_process, case):
    kwargs, code, message = GRPC_CASES[case]
    got, details = grpc_infer(stub, **kwargs)
    assert got.name == code, (case, got, details)
    assert message in details, (case, details)
    assert_serving(rel_server, stub)


@pytest.mark.parametrize("text", [b"a" * TEN_MB, "\u00e9".encode() * (TEN_MB // 2)], ids=["ascii", "two-byte"])
def test_grpc_10mb_string_is_truncated_not_refused(rel_server, stub, same_process, text):
    # The contract: text over the token budget is cut and flagged, whatever its size (model.py reads at
    # most 256 x 64 characters of it), so a 10 MB string is answered, not refused.
    code, outputs = grpc_infer(stub, [element(text)], [1, 1])
    assert code == grpc.StatusCode.OK, outputs
    assert outputs["TRUNCATED"] == ([1, 1], b"\x01")
    assert_serving(rel_server, stub)


# -- HTTP/JSON and the HTTP binary extension, through the guard --------------------------------------
HTTP_JSON_CASES = {
    "wrong dtype": (dict(texts=[1.0], shape=[1, 1], datatype="FP32"), 400, "data-type"),
    "wrong shape": (dict(texts=["a", "b"], shape=[1, 2]), 400, "unexpected shape"),
    "empty batch": (dict(texts=[], shape=[0, 1]), 400, ""),
    "batch above max_batch_size": (dict(texts=["x"] * (MAX_BATCH + 1)), 400, "batch-size must be <= 256"),
    "empty text": (dict(texts=["ok", ""]), 400, "row 1: empty text"),
    "unknown output": (dict(texts=["a"], outputs=["nope"]), 400, "unexpected inference output 'nope'"),
    "unknown input name": (dict(texts=["a"], name="NOPE"), 400, "NOPE"),
}


@pytest.mark.parametrize("case", list(HTTP_JSON_CASES))
def test_http_json_hostile_request_gets_an_error_and_the_server_keeps_serving(rel_server, stub, same_process, case):
    kwargs, status, message = HTTP_JSON_CASES[case]
    got, body = http_json(rel_server, **kwargs)
    assert got == status and message in body.get("error", ""), (case, got, body)
    assert_serving(rel_server, stub)


def test_http_json_invalid_utf8_inside_a_string(rel_server, stub, same_process):
    body = b'{"inputs":[{"name":"TEXT","shape":[1,1],"datatype":"BYTES","data":["bad \xff\xfe byte"]}]}'
    status, answer = http_post(rel_server, body, {"Content-Type": "application/json"})
    assert status == 400 and "row 0: invalid UTF-8" in answer["error"], answer
    assert_serving(rel_server, stub)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_http_json_10mb_string(rel_server, stub, same_process, content_type):
    # Sent straight to Triton 2.51 with the form content type (curl -d's default), this request kills
    # the whole server with SIGSEGV; the guard forwards it as application/json.
    status, body = http_json(rel_server, ["a" * TEN_MB], content_type=content_type)
    assert status == 200, body
    assert {o["name"]: o["data"] for o in body["outputs"]}["TRUNCATED"] == [True]
    assert_serving(rel_server, stub)


HTTP_BINARY_CASES = {
    "length prefix past the end": (dict(raw=struct.pack("<I", 500) + b"hello", shape=[1, 1]), 400,
                                   "incomplete string data"),
    "length prefix 0xFFFFFFFF": (dict(raw=struct.pack("<I", 0xFFFFFFFF) + b"hello", shape=[1, 1]), 400,
                                 "incomplete string data"),
    "truncated length prefix": (dict(raw=b"\x05\x00", shape=[1, 1]), 400, "length indicator"),
    "bytes after the last element": (dict(raw=struct.pack("<I", 2) + b"hello", shape=[1, 1]), 400,
                                     "length indicator"),
    "more elements than the shape": (dict(raw=elements(b"a", b"b"), shape=[1, 1]), 400, "string elements"),
    "fewer elements than the shape": (dict(raw=elements(b"a"), shape=[2, 1]), 400, "string elements"),
    "no bytes at all": (dict(raw=b"", shape=[1, 1]), 400, ""),
    "binary_data_size larger than the data": (dict(raw=elements(b"hello"), shape=[1, 1], binary_size=100), 400,
                                              "unexpected size"),
    "header length past the body": (dict(raw=elements(b"hello"), shape=[1, 1], header_length=10**9), 400,
                                    "Inference-Header-Content-Length"),
    "invalid UTF-8": (dict(raw=elements(b"\xff\xfe\xfd"), shape=[1, 1]), 400, "row 0: invalid UTF-8"),
    "batch above max_batch_size": (dict(raw=elements(*[b"x"] * (MAX_BATCH + 1)), shape=[MAX_BATCH + 1, 1]), 400,
                                   "batch-size"),
}


@pytest.mark.parametrize("case", list(HTTP_BINARY_CASES))
def test_http_binary_hostile_request_gets_an_error_and_the_server_keeps_serving(rel_server, stub, same_process, case):
    kwargs, status, message = HTTP_BINARY_CASES[case]
    got, body = http_binary(rel_server, **kwargs)
    assert got == status and message in body.get("error", ""), (case, got, body)
    assert_serving(rel_server, stub)


def test_http_binary_10mb_string_is_truncated(rel_server, stub, same_process):
    status, body = http_binary(rel_server, element(b"b" * TEN_MB), [1, 1])
    assert status == 200, body
    assert_serving(rel_server, stub)


# -- request shapes Triton 2.51 cannot survive: the guard answers them itself ------------------------
def _raw_http(server, head: str, body_chunks) -> bytes:
    COUNTS.inputs += 1
    with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            sock.sendall(chunk)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_deeply_nested_json_is_refused_by_the_guard(rel_server, stub, same_process):
    # 200,000 nested arrays (400 KB) overflow Triton 2.51's recursive JSON parser: SIGSEGV.
    nested = b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    status, body = http_post(rel_server, nested, {"Content-Type": "application/json"})
    assert status == 400 and "nested too deeply" in body["error"], body
    assert_serving(rel_server, stub)


def test_form_encoded_body_over_4mb_reaches_triton_as_json(rel_server, stub, same_process):
    # Python's urllib, like curl -d, labels a body application/x-www-form-urlencoded. Triton 2.51 parses
    # such a body as a form before looking at it; from ~4 MB that crashes it. Garbage in that shape
    # now gets the guard's JSON error.
    status, body = http_post(rel_server, b"x=" + b"a" * (6 * 1024 * 1024), {})
    assert status == 400 and "failed to parse the request JSON" in body["error"], body
    assert_serving(rel_server, stub)


def test_metrics_port_refuses_a_large_form_body(rel_server, stub, same_process):
    # The metrics endpoint has the same flaw; it needs no body at all.
    head = (f"POST /metrics HTTP/1.1\r\nHost: {rel_server.host}\r\nContent-Length: {5_000_000}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n")
    COUNTS.inputs += 1
    with socket.create_connection((rel_server.host, rel_server.metrics_port), timeout=60) as sock:
        sock.sendall(head.encode() + b"a" * 5_000_000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with urllib.request.urlopen(rel_server.metrics_url, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()
    assert_serving(rel_server, stub)


def test_chunked_body_is_refused(rel_server, stub, same_process):
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {rel_server.host}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n")
    answer = _raw_http(rel_server, head, [b"1\r\n{\r\n" * 1000, b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert_serving(rel_server, stub)


def test_oversized_body_is_refused(rel_server, stub, same_process):
    size = rel_server.max_http_body_bytes + 1
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {rel_server.host}\r\nContent-Length: {size}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n")
    answer = _raw_http(rel_server, head, [b" " * (8 << 20)] * (size // (8 << 20)) + [b" " * (size % (8 << 20))])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert_serving(rel_server, stub)


def test_gzip_bomb_is_refused(rel_server, stub, same_process):
    bomb = gzip.compress(b" " * (rel_server.max_http_body_bytes + (1 << 20)), compresslevel=9)
    status, body = http_post(rel_server, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 413 and "inflates to more than" in body["error"], body
    assert_serving(rel_server, stub)


def test_gzip_request_still_works(rel_server, stub, same_process):
    payload = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                      "data": ["Shares rallied"]}]}).encode()
    status, body = http_post(rel_server, gzip.compress(payload), {"Content-Type": "application/json",
                                                                  "Content-Encoding": "gzip"})
    assert status == 200, body


# -- random BYTES payloads ---------------------------------------------------------------------------
raw_payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(st.binary(max_size=24), max_size=6).map(lambda items: elements(*items)),
    st.lists(st.binary(max_size=24), min_size=1, max_size=6).map(lambda items: elements(*items)[:-1]),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=16)).map(lambda t: struct.pack("<I", t[0]) + t[1]),
)
shapes = st.sampled_from([[1, 1], [2, 1], [3, 1], [0, 1], [1], [1, 2]])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_payloads, shape=shapes, over_http=st.booleans())
def test_random_bytes_payloads_never_break_the_server(rel_server, stub, raw, shape, over_http):
    if over_http:
        status, body = http_binary(rel_server, raw, shape)
        assert status in (200, 400), body
    else:
        code, details = grpc_infer(stub, [raw], shape)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details


def test_after_the_random_payloads_the_same_server_still_serves(rel_server, stub):
    assert rel_server.restarts == 0 and rel_server.failure is None, rel_server.events
    assert_serving(rel_server, stub)
    np.testing.assert_equal(len(rel_server.stub_pids()), INSTANCES)
