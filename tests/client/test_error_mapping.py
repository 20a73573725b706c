"""Translating tritonclient's exceptions into the client's error tree; retries with backoff."""

import contextlib
import random
import socket
import ssl
import threading
import time

import pytest
from tritonclient.utils import InferenceServerException

from mtl_client import (
    InvalidInputError,
    ModelContractError,
    ModelNotFoundError,
    MTLClientError,
    MultiTaskClient,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from mtl_client.errors import TlsMismatchError, backoff_delay, is_transient, speaks_tls, translate


def _error(status, message="boom"):
    return InferenceServerException(msg=message, status=status)


@pytest.mark.parametrize(
    "status, kind",
    [
        ("StatusCode.UNAVAILABLE", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError),
        ("StatusCode.NOT_FOUND", ModelNotFoundError),
        ("StatusCode.INVALID_ARGUMENT", InvalidInputError),
        ("StatusCode.RESOURCE_EXHAUSTED", InvalidInputError),
        ("StatusCode.INTERNAL", ServerError),
        ("StatusCode.UNAUTHENTICATED", ServerError),
        (None, ServerError),
    ],
)
def test_every_status_maps_into_the_tree(status, kind):
    error = translate(_error(status), url="h:1", model="m")
    assert type(error) is kind and isinstance(error, MTLClientError)
    assert "boom" in str(error)


def test_tree_shape():
    assert issubclass(ModelNotFoundError, ServerError)
    for kind in (ServerUnavailableError, RequestTimeoutError, InvalidInputError, ServerError, ModelContractError):
        assert issubclass(kind, MTLClientError)


def test_server_row_becomes_the_callers_index():
    # The request held the caller's texts 40, 41, 45 (others were passed through); the server's row 2 is 45.
    error = translate(
        _error("StatusCode.INVALID_ARGUMENT", "row 2: empty text"), url="h:1", model="m", rows=[40, 41, 45]
    )
    assert isinstance(error, InvalidInputError)
    assert error.index == 45 and error.reason == "empty text" and str(error) == "texts[45]: empty text"


def test_server_row_without_mapping_keeps_the_message():
    for rows in (None, [0]):
        error = translate(
            _error("StatusCode.INVALID_ARGUMENT", "row 3: invalid UTF-8 at byte 0"), url="h:1", model="m", rows=rows
        )
        assert error.index is None and "row 3: invalid UTF-8 at byte 0" in str(error)


def test_only_unavailable_is_transient():
    assert is_transient(ServerUnavailableError("x"))
    assert not any(is_transient(k("x")) for k in (RequestTimeoutError, InvalidInputError, ServerError))


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(5)
    for attempt in range(12):
        ceiling = min(5.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, 0.1, 5.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_retried_then_reported():
    url = f"127.0.0.1:{_closed_port()}"
    with MultiTaskClient(url, retries=2, timeout_s=2) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="gave up after 2 retries") as info:
            client.predict(["hello"])
        # Two backoffs of at least 0.05 s and 0.1 s; no timeout waited for.
        assert 0.15 <= time.monotonic() - started < 2
        assert isinstance(info.value.__cause__, InferenceServerException)
    with MultiTaskClient(url, retries=0) as client, pytest.raises(ServerUnavailableError) as info:
        client.health()
    assert "retries" not in str(info.value)


def test_wait_until_ready_gives_up_after_its_timeout():
    with MultiTaskClient(f"127.0.0.1:{_closed_port()}") as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="not ready after 0.6s"):
            client.wait_until_ready(timeout_s=0.6, interval_s=0.1)
        assert time.monotonic() - started < 2


def test_client_arguments_are_checked():
    with pytest.raises(MTLClientError, match="HTTP url"):
        MultiTaskClient("http://localhost:8000")
    with pytest.raises(MTLClientError, match="does not exist"):
        MultiTaskClient("localhost:8001", root_certificates="/nonexistent/ca.pem")
    for bad in ({"concurrency": 0}, {"retries": -1}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            MultiTaskClient("localhost:8001", **bad)
    with MultiTaskClient("grpc://localhost:8001", headers={"X-Team": "ml"}) as client:
        assert client.url == "localhost:8001"
        assert client.settings.headers == {"x-team": "ml"}  # gRPC metadata keys are lowercase
    client.close()  # closing twice is harmless
    with pytest.raises(MTLClientError, match="closed"):
        client.predict(["x"])


def test_a_server_shutting_down_is_transient():
    from tritonclient.utils import InferenceServerException

    from mtl_client.errors import ServerUnavailableError, is_transient, translate

    for status, message in [
        ("StatusCode.CANCELLED", "cancelled"),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'multitask' has no available versions"),
    ]:
        error = translate(InferenceServerException(message, status=status), url="u", model="multitask")
        assert isinstance(error, ServerUnavailableError) and is_transient(error)
    missing = translate(
        InferenceServerException("Request for unknown model: 'nope' is not found", status="StatusCode.NOT_FOUND"),
        url="u",
        model="nope",
    )
    assert not is_transient(missing)


# What a client saw while a python-backend stub was killed under traffic and mtl-serve's watchdog restarted
# Triton (recorded against LocalTriton): first INTERNAL, then the restart's NOT_FOUND, UNAVAILABLE and CANCELLED.
RESTART_ANSWERS = [
    ("StatusCode.INTERNAL", "Stub process 'multitask_0_0' is not healthy."),
    ("StatusCode.INTERNAL", "Stub process is not healthy."),
    (
        "StatusCode.INTERNAL",
        "Failed to process the request(s) for model instance 'multitask_0_1', message: "
        "Stub process 'multitask_0_1' is not healthy.",
    ),
    (
        "StatusCode.UNAVAILABLE",
        "[request id: <id_unknown>] Server is stopping, scheduler for model has stopped "
        "accepting new inference requests",
    ),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'multitask' has no available versions"),
    ("StatusCode.UNAVAILABLE", "Stream removed (recvmsg:Connection reset by peer (104))"),
    (
        "StatusCode.UNAVAILABLE",
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:37419: "
        "Failed to connect to remote host: Connection refused",
    ),
]


@pytest.mark.parametrize("status, message", RESTART_ANSWERS)
def test_a_model_being_restarted_is_transient(status, message):
    error = translate(_error(status, message), url="h:1", model="multitask")
    assert isinstance(error, ServerUnavailableError) and is_transient(error)
    assert str(error).startswith("server at h:1 is unavailable") and message in str(error)


def test_other_internal_errors_are_not_retried():
    error = translate(
        _error("StatusCode.INTERNAL", "Failed to execute the model: CUDA out of memory"), url="h:1", model="m"
    )
    assert type(error) is ServerError and not is_transient(error)


# gRPC's own words (grpcio 1.85, recorded against LocalTriton with and without --grpc-server-cert).
NOT_TLS = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:59285: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: "
    "Invalid certificate verification context: OK"
)
UNTRUSTED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:58995: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:{port}: Socket closed"


def test_a_tls_client_against_a_plaintext_server_is_one_clear_error_and_not_retried():
    error = translate(_error("StatusCode.UNAVAILABLE", NOT_TLS), url="h:1", model="m")
    assert isinstance(error, TlsMismatchError) and isinstance(error, ServerUnavailableError)
    assert not is_transient(error)
    assert str(error) == (
        "server at h:1 is unavailable over TLS: it does not speak TLS (the handshake failed with "
        "WRONG_VERSION_NUMBER); connect without --ssl and the certificate options (ssl=False)"
    )


def test_an_untrusted_certificate_is_not_retried():
    error = translate(_error("StatusCode.UNAVAILABLE", UNTRUSTED), url="h:1", model="m")
    assert isinstance(error, TlsMismatchError) and not is_transient(error)
    assert "not trusted (CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate)" in str(error)
    assert "--root-certificates" in str(error)


@pytest.fixture
def tls_listener(tls_material):
    """A bare TLS server on a free port (the test certificate), accepting until the test ends."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_material["cert"], tls_material["key"])
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = sock.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    sock.close()


def test_a_closed_socket_from_a_tls_server_is_a_tls_mismatch(tls_listener):
    message = CLOSED.format(port=tls_listener.rpartition(":")[2])
    for tls, advice in (
        (False, "connect with --ssl"),
        (True, "--private-key and --certificate-chain"),
        (None, "a plaintext client needs --ssl"),
    ):
        error = translate(_error("StatusCode.UNAVAILABLE", message), url=tls_listener, model="m", tls=tls)
        assert isinstance(error, TlsMismatchError) and not is_transient(error), tls
        assert str(error).startswith(f"server at {tls_listener} is unavailable: it serves gRPC over TLS")
        assert advice in str(error)


def test_a_closed_socket_from_anything_else_stays_transient():
    with socket.create_server(("127.0.0.1", 0)) as plain:  # listening, but never speaking TLS
        url = f"127.0.0.1:{plain.getsockname()[1]}"
        assert not speaks_tls(url, timeout_s=0.5)
        error = translate(_error("StatusCode.UNAVAILABLE", CLOSED.format(port=0)), url=url, model="m")
    assert type(error) is ServerUnavailableError and is_transient(error)
    closed = f"127.0.0.1:{_closed_port()}"
    assert not speaks_tls(closed)
    assert is_transient(translate(_error("StatusCode.UNAVAILABLE", CLOSED.format(port=0)), url=closed, model="m"))
