"""Bounded request size on every port, and the memory of a server after a storm of oversized requests.

Triton 2.51 takes gRPC requests of up to 2 GiB and has no option to refuse less; it keeps most of what such
a request made it allocate (test_bundled_server_limits.py measures that). The gRPC guard in front of it
refuses a request over `max_grpc_request_bytes` (RESOURCE_EXHAUSTED) before Triton sees any of it; the HTTP
guard does the same for bodies (413: test_hostile_inputs.py). Memory of Triton, its stubs and its /dev/shm
regions is compared before and after: it must stay within 32 MiB of where it was (a few MiB of noise is normal).
"""

from __future__ import annotations

import gc
import struct

import grpc
import psutil
import pytest
from rel_helpers import COUNTS, MIB, mib, server_memory
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.reliability
ROW_BYTES = 1024 * 1024
TOLERANCE = 32 * MIB


def _request(model: str, rows: int, row_bytes: int) -> bytes:
    """A serialised ModelInferRequest of `rows` texts of `row_bytes` each, as any gRPC client can send."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "TEXT", "BYTES"
    tensor.shape.extend([rows, 1])
    element = struct.pack("<I", row_bytes) + b"a" * row_bytes
    request.raw_input_contents.append(element * rows)
    return request.SerializeToString()


def _send(url: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send serialised bytes as they are, with no client-side size limit."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(url, options=options) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        COUNTS.inputs += 1
        try:
            call(payload, timeout=300)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_serving(url: str, model: str) -> None:
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(url, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest.FromString(_request(model, 2, 16))
        COUNTS.inputs += 1
        assert stub.ModelInfer(request, timeout=60).outputs


def test_grpc_request_over_the_limit_is_refused_and_memory_stays_put(rel_server, test_config):
    model, rows = test_config.serving.model_name, test_config.serving.max_batch_size
    limit = rel_server.max_grpc_request_bytes
    _assert_serving(rel_server.grpc_url, model)
    same = (rel_server.pid, sorted(rel_server.stub_pids()), rel_server.restarts)
    before, guard_before = server_memory(rel_server), psutil.Process().memory_info().rss
    # The storm: max_batch_size rows of 1 MiB (256 MiB here), twice; then requests just over the limit.
    storm = [_request(model, rows, ROW_BYTES)] * 2 + [_request(model, 1, limit)] * 8
    answers = [_send(rel_server.grpc_url, payload) for payload in storm]
    sizes = sorted({len(p) for p in storm})
    del storm
    gc.collect()
    after, guard_after = server_memory(rel_server), psutil.Process().memory_info().rss
    COUNTS.notes.append(
        f"gRPC storm of {len(answers)} requests of {sizes[0] / MIB:,.0f} to {sizes[-1] / MIB:,.0f} MiB (limit "
        f"{limit / MIB:,.1f} MiB): {mib(before)} before, {mib(after)} after; the guard's process "
        f"{guard_before / MIB:,.0f} -> {guard_after / MIB:,.0f} MiB"
    )
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in answers), answers
    assert all("larger than max" in details for _, details in answers), answers[0]
    for part in before:
        assert after[part] - before[part] <= TOLERANCE, (part, mib(before), mib(after))
    assert (rel_server.pid, sorted(rel_server.stub_pids()), rel_server.restarts) == same, rel_server.events
    _assert_serving(rel_server.grpc_url, model)
