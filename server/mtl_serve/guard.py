"""A small HTTP/1.1 reverse proxy in front of Triton's HTTP and metrics endpoints.

Triton 2.51 (the binary in nvidia-pytriton 0.7.0) dies with SIGSEGV, taking every model with it, on
HTTP requests that a client can send by accident (measurements in docs/reliability.md):
  - a body of about 4 MB or more sent with `Content-Type: application/x-www-form-urlencoded`, which
    is what `curl -d` and Python's urllib send by default; on every HTTP endpoint, metrics included;
  - JSON nested a few hundred thousand levels deep (a body of ~400 KB).
Only requests that cannot take those shapes are forwarded: the content type is set from the body's
layout, bodies are bounded, request compression is undone here within the same bound, chunked bodies
are refused, and JSON that Python's parser refuses (malformed, or nested deeper than ~1,000 levels)
is refused with 400. Requests Triton would reset without an answer get a 4xx here instead: a request
target or header line over ~8 KB (431/414), a target that is not a path (`OPTIONS *`: 400); so do
inference shapes out of range (a dimension of 2**63 was answered 200). Everything else, including
every inference error, comes from Triton unchanged, except while the owner (UpstreamHealth) says that
Triton is not fit to serve: then the ready endpoints and inference answer 503.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .health import STUB_FAILURE, UpstreamHealth

log = logging.getLogger("mtl_serve.guard")

# Above any valid request (256 rows of 16,384 characters, the most the model reads, are under 17 MB
# of JSON) and small enough to bound what one request can make the proxy and Triton hold.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Inference can take a while on a CPU (256 long rows); a dead upstream is seen at once anyway.
UPSTREAM_TIMEOUT_S = 600.0
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "expect",
    }
)
HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton 2.51 resets the connection, without an answer, for a request target over 8,189 bytes or a header
# name or value over 8,191 bytes (measured); below that it has no limit on the number of headers.
MAX_TARGET_BYTES = 8000
MAX_HEADER_LINE_BYTES = 8000
# Like Triton's own listen backlog (1,024): a burst of connections waits to be accepted instead of being reset.
LISTEN_BACKLOG = 1024
# The largest dimension a tensor can have here: beyond, Triton's int64 arithmetic on shapes overflows.
MAX_DIM = 2**31 - 1
INFER_PATH = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer$")
READY_PATH = re.compile(r"^/v2/(?:health/ready|models/[^/?]+(?:/versions/[^/?]+)?/ready)$")


class Rejected(Exception):
    """A request the guard answers itself, with `status` and a Triton-style {"error": ...} body."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


class ModelLimits:
    """The request shapes a model accepts, from its config as Triton serves it (GET /v2/models/NAME/config).

    Only dimensions no tensor can have are refused here: a batch outside 0..max_batch_size, any other
    dimension outside 0..MAX_DIM, a dimension that is not a whole number. Triton checks the rest itself."""

    def __init__(self, config: dict):
        self.max_batch_size = int(config.get("max_batch_size") or 0)

    def check(self, model: str, document) -> None:
        inputs = document.get("inputs") if isinstance(document, dict) else None
        for tensor in inputs if isinstance(inputs, list) else []:
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if not isinstance(shape, list):
                continue  # Triton answers a missing or malformed shape itself
            name = tensor.get("name")
            for position, dim in enumerate(shape):
                if not isinstance(dim, int) or isinstance(dim, bool):
                    raise Rejected(HTTPStatus.BAD_REQUEST, f"input {name!r}: shape {shape} must hold whole numbers")
                if position == 0 and self.max_batch_size > 0:
                    if not 0 <= dim <= self.max_batch_size:
                        raise Rejected(
                            HTTPStatus.BAD_REQUEST,
                            f"input {name!r}: shape {shape}: inference request batch-size must be <= "
                            f"{self.max_batch_size} for {model!r} (and not negative)",
                        )
                elif not 0 <= dim <= MAX_DIM:
                    raise Rejected(
                        HTTPStatus.BAD_REQUEST,
                        f"input {name!r}: shape {shape}: dimension {position} must be from 0 to {MAX_DIM:,}",
                    )


def _whole_number(value: str) -> bool:
    return re.fullmatch(r"[0-9]{1,15}", value.strip()) is not None


def check_json(document: bytes):
    """The parsed document; refuses JSON that Python's parser refuses (malformed, nested deeper than ~1,000 levels)."""
    # Undecodable bytes become U+FFFD so that a bad byte early on cannot hide what follows it.
    try:
        return json.loads(document.decode("utf-8", "replace"), strict=False)
    except RecursionError:
        raise Rejected(HTTPStatus.BAD_REQUEST, "request JSON is nested too deeply") from None
    except ValueError as exc:
        raise Rejected(HTTPStatus.BAD_REQUEST, f"failed to parse the request JSON: {exc}") from None


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo gzip/deflate request compression, refusing output over `limit` bytes (a zip bomb)."""
    # 32 + 15: accept both the gzip and the zlib wrapper, as Triton does for gzip and deflate.
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise Rejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the {encoding} request body inflates to more than {limit:,} bytes",
                close=True,
            )
        out += inflater.flush()
    except zlib.error as exc:
        raise Rejected(HTTPStatus.BAD_REQUEST, f"the {encoding} request body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise Rejected(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the {encoding} request body inflates to more than {limit:,} bytes",
            close=True,
        )
    return out


def check_target(target: str) -> str:
    """The path to forward for a request target: origin-form as it is, absolute-form cut to its path."""
    if len(target) > MAX_TARGET_BYTES:
        raise Rejected(
            HTTPStatus.REQUEST_URI_TOO_LONG,
            f"request target of {len(target):,} bytes is over the {MAX_TARGET_BYTES:,}-byte limit",
            close=True,
        )
    if target.startswith("/"):
        return target
    parts = urlsplit(target)
    if parts.scheme in ("http", "https") and parts.netloc:
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    raise Rejected(
        HTTPStatus.BAD_REQUEST, f"request target {target[:80]!r} is not a path: nothing is served there", close=True
    )


def check_headers(headers) -> None:
    for name, value in headers.items():
        if len(name) + len(value) + 2 > MAX_HEADER_LINE_BYTES:
            raise Rejected(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"header {name[:40]!r} is over the {MAX_HEADER_LINE_BYTES:,}-byte limit of a header line",
                close=True,
            )


def vet(method: str, headers, body: bytes, max_body_bytes: int, limits=None) -> tuple[bytes, str, dict[str, str]]:
    """(body to forward, its content type, extra headers) for a request with `body` already read.

    `limits` is a (model name, ModelLimits) pair for an inference request, checked against its shapes."""
    extra: dict[str, str] = {}
    encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = decompress(body, encoding, max_body_bytes)
    elif encoding != "identity":
        raise Rejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none"
        )
    json_length = len(body)
    declared = headers.get(HEADER_LENGTH)
    if declared is not None:
        if not _whole_number(declared) or int(declared) > len(body):
            raise Rejected(
                HTTPStatus.BAD_REQUEST,
                f"{HEADER_LENGTH} must be a whole number of bytes no larger than the body "
                f"({len(body):,}), got {declared!r}",
            )
        json_length = int(declared)
        extra[HEADER_LENGTH] = str(json_length)
    if method in ("POST", "PUT") and json_length:
        document = check_json(body[:json_length])
        if limits is not None:
            limits[1].check(limits[0], document)
    # Triton parses a form-urlencoded body on its stack (the crash above); no endpoint needs that type.
    content_type = "application/json" if json_length == len(body) else "application/octet-stream"
    return body, content_type, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mtl-serve-guard"
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 120
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)
            if self.upstream is not None:
                self.upstream.close()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args) -> None:  # the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), [("Content-Type", "application/json")])

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise Rejected(
                HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not accepted: send Content-Length", close=True
            )
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not _whole_number(length):
            raise Rejected(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}", close=True)
        size = int(length)
        if size > self.server.max_body_bytes:
            # Read (and drop) a moderately oversized body so that the client gets the 413, not a reset.
            if size <= 4 * self.server.max_body_bytes + (16 << 20):
                self._discard(size)
            raise Rejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {size:,} bytes is over the {self.server.max_body_bytes:,}-byte limit",
                close=True,
            )
        body = self.rfile.read(size)
        if len(body) != size:
            raise ConnectionError("the client closed the connection in the middle of its request body")
        return body

    def _discard(self, size: int) -> None:
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 20))
            if not chunk:
                return
            size -= len(chunk)

    def _forward(self, body: bytes, content_type: str, extra: dict[str, str]):
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != HEADER_LENGTH.lower()
        }
        headers.update(extra)
        if body or self.command in ("POST", "PUT"):
            headers["Content-Type"] = content_type
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.server.upstream, timeout=UPSTREAM_TIMEOUT_S)
            try:
                self.upstream.request(self.command, self.path, body=body or None, headers=headers)
                return self.upstream.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.upstream.close()
                self.upstream = None
                # A kept-alive upstream connection may have been closed by Triton in between: retry once.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _refuse(self, rejected: Rejected) -> None:
        self.close_connection = self.close_connection or rejected.close
        # A 503 while Triton restarts is the owner's news (its watchdog logs it), not the client's fault.
        level = logging.DEBUG if rejected.status == HTTPStatus.SERVICE_UNAVAILABLE else logging.WARNING
        log.log(level, "refused %s %s from %s: %s", self.command, self.path[:200], self.client_address[0], rejected)
        self.server.count_refusal()
        self._error(rejected.status, str(rejected))

    def _handle(self) -> None:
        health = self.server.health
        try:
            check_headers(self.headers)
            self.path = check_target(self.path)
        except Rejected as rejected:
            self._refuse(rejected)
            return
        route = self.path.split("?")[0]
        infer = INFER_PATH.match(route)
        try:
            body = self._read_body()
            if (infer or READY_PATH.match(route)) and not health.ready():
                raise Rejected(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "Triton is restarting (its python-backend stub failed): retry shortly",
                )
            limits = self.server.model_limits(infer.group(1)) if infer and self.command == "POST" else None
            body, content_type, extra = vet(
                self.command,
                self.headers,
                body,
                self.server.max_body_bytes,
                (infer.group(1), limits) if limits else None,
            )
        except Rejected as rejected:
            self._refuse(rejected)
            return
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        generation = health.generation()
        try:
            response = self._forward(body, content_type, extra)
            payload = response.read()
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            self.close_connection = True
            self._error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"Triton is not answering ({exc.__class__.__name__}): it is starting, restarting or stopped",
            )
            return
        # Triton's own Content-Type and Content-Encoding describe the payload; pass them on.
        passed = HOP_BY_HOP - {"content-type", "content-encoding"}
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in passed]
        if response.will_close:
            self.upstream.close()
            self.upstream = None
        failure = STUB_FAILURE.search(payload.decode(errors="replace")) if response.status >= 400 else None
        if failure and health.stub_failed(generation, failure.group(0)):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"{failure.group(0)}. Triton is being restarted: retry shortly")
            return
        self._reply(response.status, payload, headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Handler threads are daemons and their connections are shut down on stop; don't wait for them.
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, upstream, max_body_bytes, health: UpstreamHealth):
        self.upstream = upstream
        self.max_body_bytes = max_body_bytes
        self.health = health
        self.refusals = 0
        self._connections: set[socket.socket] = set()
        self._limits: dict[str, ModelLimits] = {}
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def model_limits(self, model: str) -> ModelLimits | None:
        """The model's limits from Triton, fetched once (model control is off: the config cannot change)."""
        with self._lock:
            if model in self._limits:
                return self._limits[model]
        connection = http.client.HTTPConnection(*self.upstream, timeout=10)
        try:
            connection.request("GET", f"/v2/models/{model}/config")
            response = connection.getresponse()
            config = json.loads(response.read()) if response.status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            config = None  # Triton answers the request itself: it is down, or the model is unknown
        finally:
            connection.close()
        if not isinstance(config, dict):
            return None
        limits = ModelLimits(config)
        with self._lock:
            self._limits[model] = limits
        return limits

    def track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def count_refusal(self) -> None:
        with self._lock:
            self.refusals += 1

    def close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class HttpGuard:
    """Listen on (host, port) and forward vetted requests to Triton at (upstream_host, upstream_port)."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream_host: str,
        upstream_port: int,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        name: str = "http",
        health: UpstreamHealth | None = None,
    ):
        self.name = name
        self._server = _Server((host, port), (upstream_host, upstream_port), max_body_bytes, health or UpstreamHealth())
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"mtl-serve-guard-{name}",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def refusals(self) -> int:
        """Requests answered by the guard itself instead of being forwarded."""
        return self._server.refusals

    def start(self) -> HttpGuard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    """`python -m mtl_serve.guard --listen 127.0.0.1:8000 --upstream 127.0.0.1:18000`: the guard alone,
    e.g. in front of a Triton container whose HTTP port is published to the guard only."""
    import argparse
    import signal
    import sys

    def address(value: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
        return host, int(port)

    parser = argparse.ArgumentParser(prog="python -m mtl_serve.guard", description=main.__doc__)
    parser.add_argument("--listen", type=address, required=True, help="HOST:PORT clients connect to")
    parser.add_argument("--upstream", type=address, required=True, help="HOST:PORT of Triton's HTTP (or metrics)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mtl-serve guard: %(message)s")
    try:
        guard = HttpGuard(*args.listen, *args.upstream, max_body_bytes=args.max_body_bytes).start()
    except OSError as exc:
        sys.exit(f"mtl-serve guard: error: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"guarding http://{args.upstream[0]}:{args.upstream[1]} on http://{args.listen[0]}:{guard.port}", flush=True)
    stop.wait()
    guard.stop()


if __name__ == "__main__":
    main()
