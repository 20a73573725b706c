"""Translating tritonclient's exceptions into the client's error tree; retries with backoff."""
import random
import socket
import time

import pytest
from tritonclient.utils import InferenceServerException

from mtl_client import (InvalidInputError, ModelContractError, ModelNotFoundError, MTLClientError, MultiTaskClient,
                        RequestTimeoutError, ServerError, ServerUnavailableError)
from mtl_client.errors import backoff_delay, is_transient, translate


def _error(status, message="boom"):
    return InferenceServerException(msg=message, status=status)


@pytest.mark.parametrize("status, kind", [
    ("StatusCode.UNAVAILABLE", ServerUnavailableError),
    ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError),
    ("StatusCode.NOT_FOUND", ModelNotFoundError),
    ("StatusCode.INVALID_ARGUMENT", InvalidInputError),
    ("StatusCode.RESOURCE_EXHAUSTED", InvalidInputError),
    ("StatusCode.INTERNAL", ServerError),
    ("StatusCode.UNAUTHENTICATED", ServerError),
    (None, ServerError),
])
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
    error = translate(_error("StatusCode.INVALID_ARGUMENT", "row 2: empty text"), url="h:1", model="m",
                      rows=[40, 41, 45])
    assert isinstance(error, InvalidInputError)
    assert error.index == 45 and error.reason == "empty text" and str(error) == "texts[45]: empty text"


def test_server_row_without_mapping_keeps_the_message():
    for rows in (None, [0]):
        error = translate(_error("StatusCode.INVALID_ARGUMENT", "row 3: invalid UTF-8 at byte 0"), url="h:1",
                          model="m", rows=rows)
        assert error.index is None and "row 3: invalid UTF-8 at byte 0" in str(error)


def test_only_unavailable_is_transient():
    assert is_transient(ServerUnavailableError("x"))
    assert not any(is_transient(k("x")) for k in (RequestTimeoutError, InvalidInputError, ServerError))


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(5)
    for attempt in range(12):
        ceiling = min(5.0, 0.1 * 2 ** attempt)
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

    for status, message in [("StatusCode.CANCELLED", "cancelled"),
                            ("StatusCode.NOT_FOUND", "Request for unknown model: 'multitask' has no available versions")]:
        error = translate(InferenceServerException(message, status=status), url="u", model="multitask")
        assert isinstance(error, ServerUnavailableError) and is_transient(error)
    missing = translate(InferenceServerException("Request for unknown model: 'nope' is not found",
                                                 status="StatusCode.NOT_FOUND"), url="u", model="nope")
    assert not is_transient(missing)
