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
import urllib.error
import urllib.request
from typing import NamedTuple

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import COUNTS
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.reliability
TEN_MB = 10 * 1024 * 1024


class Served(NamedTuple):
    """What the tests expect of the served model, from the config its repository was built from."""

    model: str
    max_batch: int
    task: str  # the first task's output
    labels: int  # its number of labels
    instances: int


@pytest.fixture(scope="module")
def served(test_config) -> Served:
    task = test_config.tasks[0]
    return Served(
        test_config.serving.model_name,
        test_config.serving.max_batch_size,
        task.name,
        len(task.labels),
        test_config.serving.instance_count,
    )


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


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


def grpc_infer(stub, model: str, raw: list[bytes], shape, datatype="BYTES", name="TEXT", outputs=()):
    request = service_pb2.ModelInferRequest(model_name=model)
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
    return grpc.StatusCode.OK, {
        o.name: (list(o.shape), raw) for o, raw in zip(response.outputs, response.raw_output_contents)
    }


def http_post(server, body: bytes, headers: dict[str, str], path: str):
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


def http_json(
    server,
    model: str,
    texts=None,
    shape=None,
    datatype="BYTES",
    name="TEXT",
    outputs=None,
    content_type="application/json",
):
    body = {
        "inputs": [
            {
                "name": name,
                "shape": shape if shape is not None else [len(texts), 1],
                "datatype": datatype,
                "data": texts,
            }
        ]
    }
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return http_post(server, json.dumps(body).encode(), {"Content-Type": content_type}, infer_path(model))


def http_binary(
    server, served: Served, raw: bytes, shape, header_length: int | None = None, binary_size: int | None = None
):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "TEXT",
                    "shape": shape,
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw) if binary_size is None else binary_size},
                }
            ],
            "outputs": [{"name": served.task, "parameters": {"binary_data": False}}],
        }
    ).encode()
    length = len(header) if header_length is None else header_length
    return http_post(
        server,
        header + raw,
        {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"},
        infer_path(served.model),
    )


def assert_serving(server, stub, served: Served) -> None:
    """The next valid request succeeds, over gRPC and over HTTP."""
    texts = elements(b"The bank's shares rallied", b"A joyful new album")
    code, outputs = grpc_infer(stub, served.model, [texts], [2, 1])
    assert code == grpc.StatusCode.OK, outputs
    assert outputs[served.task][0] == [2, served.labels] and outputs["TRUNCATED"][0] == [2, 1]
    status, body = http_json(server, served.model, ["The phone update is great"])
    assert status == 200, body
    assert {o["name"]: o["shape"] for o in body["outputs"]}[served.task] == [1, served.labels]


# -- gRPC, raw_input_contents built by hand ------------------------------------------------------------
def grpc_cases(max_batch: int) -> dict:
    return {
        "wrong dtype": (dict(raw=[b"\0\0\0\0"], shape=[1, 1], datatype="FP32"), "INVALID_ARGUMENT", "data-type"),
        "wrong shape": (dict(raw=[elements(b"a", b"b")], shape=[1, 2]), "INVALID_ARGUMENT", "unexpected shape"),
        "no batch dimension": (dict(raw=[elements(b"a", b"b")], shape=[2]), "INVALID_ARGUMENT", "unexpected shape"),
        "empty batch": (dict(raw=[b""], shape=[0, 1]), "INVALID_ARGUMENT", ""),
        "batch above max_batch_size": (
            dict(raw=[elements(*[b"x"] * (max_batch + 1))], shape=[max_batch + 1, 1]),
            "INVALID_ARGUMENT",
            f"batch-size must be <= {max_batch}",
        ),
        "invalid UTF-8 in row 1": (
            dict(raw=[elements(b"fine", b"\xc3\x28 bad", b"fine")], shape=[3, 1]),
            "INVALID_ARGUMENT",
            "row 1: invalid UTF-8",
        ),
        "empty text": (dict(raw=[elements(b"   ")], shape=[1, 1]), "INVALID_ARGUMENT", "row 0: empty text"),
        "length prefix past the end": (
            dict(raw=[struct.pack("<I", 500) + b"hello"], shape=[1, 1]),
            "INVALID_ARGUMENT",
            "incomplete string data",
        ),
        "length prefix 0xFFFFFFFF": (
            dict(raw=[struct.pack("<I", 0xFFFFFFFF) + b"hello"], shape=[1, 1]),
            "INVALID_ARGUMENT",
            "incomplete string data",
        ),
        "truncated length prefix": (dict(raw=[b"\x05\x00"], shape=[1, 1]), "INVALID_ARGUMENT", "length indicator"),
        "bytes after the last element": (
            dict(raw=[struct.pack("<I", 2) + b"hello"], shape=[1, 1]),
            "INVALID_ARGUMENT",
            "length indicator",
        ),
        "more elements than the shape": (
            dict(raw=[elements(b"a", b"b")], shape=[1, 1]),
            "INVALID_ARGUMENT",
            "string elements",
        ),
        "fewer elements than the shape": (
            dict(raw=[elements(b"a")], shape=[3, 1]),
            "INVALID_ARGUMENT",
            "string elements",
        ),
        "empty raw content": (dict(raw=[b""], shape=[1, 1]), "INVALID_ARGUMENT", "string elements"),
        "no raw content": (dict(raw=[], shape=[1, 1]), "INVALID_ARGUMENT", "unable to find data"),
        "unknown input name": (dict(raw=[elements(b"a")], shape=[1, 1], name="NOPE"), "INVALID_ARGUMENT", "NOPE"),
        "unknown output": (
            dict(raw=[elements(b"a")], shape=[1, 1], outputs=["nope"]),
            "INVALID_ARGUMENT",
            "unexpected inference output 'nope'",
        ),
        "10 MB of invalid UTF-8": (
            dict(raw=[element(b"\xff" * TEN_MB)], shape=[1, 1]),
            "INVALID_ARGUMENT",
            "row 0: invalid UTF-8",
        ),
    }


@pytest.mark.parametrize("case", list(grpc_cases(1)))
def test_grpc_hostile_request_gets_an_error_and_the_server_keeps_serving(rel_server, stub, served, same_process, case):
    kwargs, code, message = grpc_cases(served.max_batch)[case]
    got, details = grpc_infer(stub, served.model, **kwargs)
    assert got.name == code, (case, got, details)
    assert message in details, (case, details)
    assert_serving(rel_server, stub, served)


@pytest.mark.parametrize("text", [b"a" * TEN_MB, "\u00e9".encode() * (TEN_MB // 2)], ids=["ascii", "two-byte"])
def test_grpc_10mb_string_is_truncated_not_refused(rel_server, stub, served, same_process, text):
    # The contract: text over the token budget is cut and flagged, whatever its size (model.py reads at
    # most 256 x 64 characters of it), so a 10 MB string is answered, not refused.
    code, outputs = grpc_infer(stub, served.model, [element(text)], [1, 1])
    assert code == grpc.StatusCode.OK, outputs
    assert outputs["TRUNCATED"] == ([1, 1], b"\x01")
    assert_serving(rel_server, stub, served)


# -- HTTP/JSON and the HTTP binary extension, through the guard --------------------------------------
def http_json_cases(max_batch: int) -> dict:
    return {
        "wrong dtype": (dict(texts=[1.0], shape=[1, 1], datatype="FP32"), 400, "data-type"),
        "wrong shape": (dict(texts=["a", "b"], shape=[1, 2]), 400, "unexpected shape"),
        "empty batch": (dict(texts=[], shape=[0, 1]), 400, ""),
        "batch above max_batch_size": (dict(texts=["x"] * (max_batch + 1)), 400, f"batch-size must be <= {max_batch}"),
        "empty text": (dict(texts=["ok", ""]), 400, "row 1: empty text"),
        "unknown output": (dict(texts=["a"], outputs=["nope"]), 400, "unexpected inference output 'nope'"),
        "unknown input name": (dict(texts=["a"], name="NOPE"), 400, "NOPE"),
    }


@pytest.mark.parametrize("case", list(http_json_cases(1)))
def test_http_json_hostile_request_gets_an_error_and_the_server_keeps_serving(
    rel_server, stub, served, same_process, case
):
    kwargs, status, message = http_json_cases(served.max_batch)[case]
    got, body = http_json(rel_server, served.model, **kwargs)
    assert got == status and message in body.get("error", ""), (case, got, body)
    assert_serving(rel_server, stub, served)


def test_http_json_invalid_utf8_inside_a_string(rel_server, stub, served, same_process):
    body = b'{"inputs":[{"name":"TEXT","shape":[1,1],"datatype":"BYTES","data":["bad \xff\xfe byte"]}]}'
    status, answer = http_post(rel_server, body, {"Content-Type": "application/json"}, infer_path(served.model))
    assert status == 400 and "row 0: invalid UTF-8" in answer["error"], answer
    assert_serving(rel_server, stub, served)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_http_json_10mb_string(rel_server, stub, served, same_process, content_type):
    # Sent straight to Triton 2.51 with the form content type (curl -d's default), this request kills
    # the whole server with SIGSEGV; the guard forwards it as application/json.
    status, body = http_json(rel_server, served.model, ["a" * TEN_MB], content_type=content_type)
    assert status == 200, body
    assert {o["name"]: o["data"] for o in body["outputs"]}["TRUNCATED"] == [True]
    assert_serving(rel_server, stub, served)


def http_binary_cases(max_batch: int) -> dict:
    return {
        "length prefix past the end": (
            dict(raw=struct.pack("<I", 500) + b"hello", shape=[1, 1]),
            400,
            "incomplete string data",
        ),
        "length prefix 0xFFFFFFFF": (
            dict(raw=struct.pack("<I", 0xFFFFFFFF) + b"hello", shape=[1, 1]),
            400,
            "incomplete string data",
        ),
        "truncated length prefix": (dict(raw=b"\x05\x00", shape=[1, 1]), 400, "length indicator"),
        "bytes after the last element": (
            dict(raw=struct.pack("<I", 2) + b"hello", shape=[1, 1]),
            400,
            "length indicator",
        ),
        "more elements than the shape": (dict(raw=elements(b"a", b"b"), shape=[1, 1]), 400, "string elements"),
        "fewer elements than the shape": (dict(raw=elements(b"a"), shape=[2, 1]), 400, "string elements"),
        "no bytes at all": (dict(raw=b"", shape=[1, 1]), 400, ""),
        "binary_data_size larger than the data": (
            dict(raw=elements(b"hello"), shape=[1, 1], binary_size=100),
            400,
            "unexpected size",
        ),
        "header length past the body": (
            dict(raw=elements(b"hello"), shape=[1, 1], header_length=10**9),
            400,
            "Inference-Header-Content-Length",
        ),
        "invalid UTF-8": (dict(raw=elements(b"\xff\xfe\xfd"), shape=[1, 1]), 400, "row 0: invalid UTF-8"),
        "batch above max_batch_size": (
            dict(raw=elements(*[b"x"] * (max_batch + 1)), shape=[max_batch + 1, 1]),
            400,
            "batch-size",
        ),
    }


@pytest.mark.parametrize("case", list(http_binary_cases(1)))
def test_http_binary_hostile_request_gets_an_error_and_the_server_keeps_serving(
    rel_server, stub, served, same_process, case
):
    kwargs, status, message = http_binary_cases(served.max_batch)[case]
    got, body = http_binary(rel_server, served, **kwargs)
    assert got == status and message in body.get("error", ""), (case, got, body)
    assert_serving(rel_server, stub, served)


def test_http_binary_10mb_string_is_truncated(rel_server, stub, served, same_process):
    status, body = http_binary(rel_server, served, element(b"b" * TEN_MB), [1, 1])
    assert status == 200, body
    assert_serving(rel_server, stub, served)


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


def test_deeply_nested_json_is_refused_by_the_guard(rel_server, stub, served, same_process):
    # 200,000 nested arrays (400 KB) overflow Triton 2.51's recursive JSON parser: SIGSEGV.
    nested = b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    status, body = http_post(rel_server, nested, {"Content-Type": "application/json"}, infer_path(served.model))
    assert status == 400 and "nested too deeply" in body["error"], body
    assert_serving(rel_server, stub, served)


def test_form_encoded_body_over_4mb_reaches_triton_as_json(rel_server, stub, served, same_process):
    # Python's urllib, like curl -d, labels a body application/x-www-form-urlencoded. Triton 2.51 parses
    # such a body as a form before looking at it; from ~4 MB that crashes it. Garbage in that shape
    # now gets the guard's JSON error.
    status, body = http_post(rel_server, b"x=" + b"a" * (6 * 1024 * 1024), {}, infer_path(served.model))
    assert status == 400 and "failed to parse the request JSON" in body["error"], body
    assert_serving(rel_server, stub, served)


def test_metrics_port_refuses_a_large_form_body(rel_server, stub, served, same_process):
    # The metrics endpoint has the same flaw; it needs no body at all.
    head = (
        f"POST /metrics HTTP/1.1\r\nHost: {rel_server.host}\r\nContent-Length: {5_000_000}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
    )
    COUNTS.inputs += 1
    with socket.create_connection((rel_server.host, rel_server.metrics_port), timeout=60) as sock:
        sock.sendall(head.encode() + b"a" * 5_000_000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with urllib.request.urlopen(rel_server.metrics_url, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()
    assert_serving(rel_server, stub, served)


def test_chunked_body_is_refused(rel_server, stub, served, same_process):
    head = (
        f"POST {infer_path(served.model)} HTTP/1.1\r\nHost: {rel_server.host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    # The guard answers on the header alone and closes; body bytes still in flight would race that close (the
    # reset can drop the answer), so the body is not sent.
    answer = _raw_http(rel_server, head, [])
    assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert_serving(rel_server, stub, served)


def test_oversized_body_is_refused(rel_server, stub, served, same_process):
    size = rel_server.max_http_body_bytes + 1
    head = (
        f"POST {infer_path(served.model)} HTTP/1.1\r\nHost: {rel_server.host}\r\nContent-Length: {size}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_http(rel_server, head, [b" " * (8 << 20)] * (size // (8 << 20)) + [b" " * (size % (8 << 20))])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert_serving(rel_server, stub, served)


def test_gzip_bomb_is_refused(rel_server, stub, served, same_process):
    bomb = gzip.compress(b" " * (rel_server.max_http_body_bytes + (1 << 20)), compresslevel=9)
    status, body = http_post(
        rel_server, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, infer_path(served.model)
    )
    assert status == 413 and "inflates to more than" in body["error"], body
    assert_serving(rel_server, stub, served)


def test_gzip_request_still_works(rel_server, stub, served, same_process):
    payload = json.dumps(
        {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["Shares rallied"]}]}
    ).encode()
    status, body = http_post(
        rel_server,
        gzip.compress(payload),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        infer_path(served.model),
    )
    assert status == 200, body


# -- requests Triton 2.51 resets without an answer: the guard answers them with a 4xx, never a 503 ---------
def _raw_exchange(server, request: bytes) -> bytes:
    COUNTS.inputs += 1
    with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _get(target: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close", "", ""]).encode()


# (request, the guard's status line); each of these, sent to Triton's own port, is reset without an answer
# (test_bundled_server_limits.py), which the guard used to pass on as 503 "Triton is not answering".
RESET_BY_TRITON = {
    "60 KB header": (_get("/v2/health/ready", "X-Big: " + "a" * 60_000), b"HTTP/1.1 431"),
    "9 KB header name": (_get("/v2/health/ready", "X" * 9_000 + ": 1"), b"HTTP/1.1 431"),
    "20 KB path": (_get("/v2/health/ready?" + "a" * 20_000), b"HTTP/1.1 414"),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"HTTP/1.1 400"),
}


@pytest.mark.parametrize("case", list(RESET_BY_TRITON))
def test_request_triton_would_reset_gets_a_4xx_from_the_guard(rel_server, stub, served, same_process, case):
    request, status_line = RESET_BY_TRITON[case]
    answer = _raw_exchange(rel_server, request)
    assert answer.startswith(status_line), answer[:300]
    assert b'"error"' in answer and b"not answering" not in answer, answer[:300]
    assert_serving(rel_server, stub, served)


def test_absolute_form_request_target_is_served(rel_server, stub, served, same_process):
    answer = _raw_exchange(rel_server, _get(f"http://{rel_server.host}:{rel_server.http_port}/v2/health/ready"))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


# Dimensions out of range: 2**63 overflows Triton's int64 and was answered 200 with one row.
OUT_OF_RANGE_SHAPES = {
    "batch 2**63": lambda max_batch: ([2**63, 1], f"batch-size must be <= {max_batch}"),
    "batch 2**64 + 1": lambda max_batch: ([2**64 + 1, 1], f"batch-size must be <= {max_batch}"),
    "negative batch": lambda max_batch: ([-1, 1], f"batch-size must be <= {max_batch}"),
    "batch max + 1": lambda max_batch: ([max_batch + 1, 1], f"batch-size must be <= {max_batch}"),
    "row dimension 2**63": lambda max_batch: ([1, 2**63], "dimension 1 must be from 0 to 2,147,483,647"),
    "fractional dimension": lambda max_batch: ([1.5, 1], "must hold whole numbers"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE_SHAPES))
@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_http_infer_shape_out_of_range_is_refused(rel_server, stub, served, same_process, case, encoding):
    shape, message = OUT_OF_RANGE_SHAPES[case](served.max_batch)
    if encoding == "json":
        status, body = http_json(rel_server, served.model, ["a"], shape=shape)
    else:
        status, body = http_binary(rel_server, served, elements(b"a"), shape)
    assert status == 400 and message in body.get("error", ""), (status, body)
    assert_serving(rel_server, stub, served)


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
def test_random_bytes_payloads_never_break_the_server(rel_server, stub, served, raw, shape, over_http):
    if over_http:
        status, body = http_binary(rel_server, served, raw, shape)
        assert status in (200, 400), body
    else:
        code, details = grpc_infer(stub, served.model, [raw], shape)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details


def test_after_the_random_payloads_the_same_server_still_serves(rel_server, stub, served):
    assert rel_server.restarts == 0 and rel_server.failure is None, rel_server.events
    assert_serving(rel_server, stub, served)
    assert len(rel_server.stub_pids()) == served.instances
