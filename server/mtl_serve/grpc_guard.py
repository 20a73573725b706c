"""A gRPC proxy in front of Triton's gRPC port: a bounded request size, and readiness that tells the truth.

Triton 2.51 takes gRPC messages of up to 2 GiB and has no option to lower that (`tritonserver --help`
lists none); two 256 MiB requests left it and its stubs holding ~2.2 GiB more, and /dev/shm 600 MiB more,
while idle (docs/reliability.md). This proxy refuses a larger request than `max_request_bytes` with
RESOURCE_EXHAUSTED before Triton sees a byte of it. Messages pass through as bytes, never parsed; metadata,
deadlines, status codes and details come through unchanged, except that:
  - while the owner says Triton is not fit to serve (a stub died or hangs, Triton is restarting),
    ServerReady and ModelReady answer ready=false and inference answers UNAVAILABLE, instead of
    Triton's READY and its INTERNAL "Stub process ... is not healthy" for every request;
  - an answer carrying that stub failure is reported to the owner, and becomes UNAVAILABLE (a transient
    error) when the owner says a restart is coming.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

from .health import STUB_FAILURE, UpstreamHealth

log = logging.getLogger("mtl_serve.grpc_guard")

SERVICE = "/inference.GRPCInferenceService/"
READY_METHODS = frozenset({SERVICE + "ServerReady", SERVICE + "ModelReady"})
INFER_METHODS = frozenset({SERVICE + "ModelInfer", SERVICE + "ModelStreamInfer"})
STREAM_METHODS = frozenset({SERVICE + "ModelStreamInfer"})
# 256 rows of 16,384 characters (the most the model reads of a row) at 4 bytes each are 16 MiB; twice
# that leaves room for a longer row that the model truncates. The client's own requests are under 4 MiB.
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
# ServerReadyResponse and ModelReadyResponse with ready=false: proto3 leaves a false bool out.
NOT_READY = b""
# Set by gRPC itself on each hop.
HOP_METADATA = ("user-agent",)
# Triton restarts on the same port: reconnect within a second instead of gRPC's backoff of up to 2 minutes.
UPSTREAM_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class GrpcGuard:
    """Listen on (host, port), with `credentials` for TLS, and forward to Triton's plaintext gRPC upstream."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream_host: str,
        upstream_port: int,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        credentials: grpc.ServerCredentials | None = None,
        health: UpstreamHealth | None = None,
    ):
        self.address = f"{host}:{port}"
        self.upstream = f"{upstream_host}:{upstream_port}"
        self.max_request_bytes = max_request_bytes
        self.health = health or UpstreamHealth()
        self._credentials = credentials
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"mtl-serve-grpc-guard-{port}", daemon=True)

    def start(self) -> GrpcGuard:
        self._thread.start()
        self._started.wait(timeout=60)
        if self._error is not None:
            raise self._error
        if not self._started.is_set():
            raise OSError(f"the gRPC guard did not start listening on {self.address}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # handed to start(), which raises it in the caller
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        channel = grpc.aio.insecure_channel(self.upstream, options=UPSTREAM_OPTIONS)
        # so_reuseport off: a second server on the same port must fail, not share it silently.
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((_Forwarder(self, channel),))
        try:
            if self._credentials is not None:
                server.add_secure_port(self.address, self._credentials)
            else:
                server.add_insecure_port(self.address)
        except RuntimeError as exc:
            await channel.close()
            raise OSError(f"cannot listen on {self.address}: {exc}") from None
        await server.start()
        self._started.set()
        await self._stop.wait()
        await server.stop(grace=1)
        await channel.close()


def _forwarded_metadata(context) -> tuple:
    return tuple((m.key, m.value) for m in context.invocation_metadata() or () if m.key not in HOP_METADATA)


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, guard: GrpcGuard, channel: grpc.aio.Channel):
        self.guard = guard
        self.channel = channel

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method in STREAM_METHODS:
            return grpc.stream_stream_rpc_method_handler(self._stream_handler(method))
        return grpc.unary_unary_rpc_method_handler(self._unary_handler(method))

    async def _refuse_while_unfit(self, method: str, context) -> None:
        if method in INFER_METHODS and not self.guard.health.ready():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "Triton is restarting (its python-backend stub failed): retry shortly"
            )

    async def _abort_with(self, error: grpc.aio.AioRpcError, generation: int, context) -> None:
        details = error.details() or ""
        if STUB_FAILURE.search(details) and self.guard.health.stub_failed(generation, details):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{details} Triton is being restarted: retry shortly")
        await context.abort(error.code(), details, tuple(error.trailing_metadata() or ()))

    def _unary_handler(self, method: str):
        upstream = self.channel.unary_unary(method)

        async def forward(request: bytes, context) -> bytes:
            if method in READY_METHODS and not self.guard.health.ready():
                return NOT_READY
            await self._refuse_while_unfit(method, context)
            generation = self.guard.health.generation()
            call = upstream(request, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            try:
                response = await call
            except grpc.aio.AioRpcError as error:
                await self._abort_with(error, generation, context)
            finally:
                if not call.done():  # the client went away: so does the upstream call
                    call.cancel()
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
            return response

        return forward

    def _stream_handler(self, method: str):
        upstream = self.channel.stream_stream(method)

        async def forward(requests, context):
            await self._refuse_while_unfit(method, context)
            generation = self.guard.health.generation()
            call = upstream(requests, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                await self._abort_with(error, generation, context)
            finally:
                if not call.done():
                    call.cancel()

        return forward
