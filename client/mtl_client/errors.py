"""The client's one error tree, and the one place tritonclient's exceptions are translated into it."""

from __future__ import annotations

import random
import re
import socket
import ssl
from collections.abc import Sequence

from tritonclient.utils import InferenceServerException

# The served model names the offending row of its own request: "row 3: empty text".
_ROW_MESSAGE = re.compile(r"^row (\d+): (.*)$", re.DOTALL)
# Triton's python backend after its stub process died: INTERNAL until the model is reloaded (mtl-serve's
# watchdog restarts Triton), so it is as transient as a restart. Both spellings are in libtriton_python.so.
_STUB_UNHEALTHY = re.compile(r"Stub process( '[^']*')? is not healthy")
# What gRPC reports when the two ends disagree about TLS, or the certificate is not trusted.
_NOT_TLS = re.compile(r"Tls handshake failed.*WRONG_VERSION_NUMBER", re.DOTALL)
_UNTRUSTED = re.compile(r"Tls handshake failed.*(CERTIFICATE_VERIFY_FAILED[^:]*(?::[^:]*)?)", re.DOTALL)
_SOCKET_CLOSED = re.compile(r"failed to connect to all addresses; last error: UNAVAILABLE: .*Socket closed")


class MTLClientError(Exception):
    """Base of every error this package raises."""


class ServerUnavailableError(MTLClientError):
    """The server cannot be reached, or said UNAVAILABLE (after the configured retries)."""


class TlsMismatchError(ServerUnavailableError):
    """The connection failed on TLS: one end speaks it and the other does not, or the certificate is not
    trusted. Never retried: the next attempt would fail the same way."""


class RequestTimeoutError(MTLClientError):
    """A call did not finish within the client's timeout (gRPC DEADLINE_EXCEEDED)."""


class InvalidInputError(MTLClientError):
    """An input text was refused, by the client's checks or by the server (INVALID_ARG).

    `index` is the 0-based position of the (first) offending text in the caller's input when it is
    known, `indices` the first few of them, `count` how many there are in all, `reason` the problem alone.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        indices: Sequence[int] = (),
        count: int | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.index = index
        self.indices = tuple(indices) if indices else ((index,) if index is not None else ())
        self.count = count if count is not None else len(self.indices)
        self.reason = reason or message


class ServerError(MTLClientError):
    """The server answered with an error that is neither the caller's input nor unavailability."""


class ModelNotFoundError(ServerError):
    """The server does not serve the requested model."""


class ModelContractError(MTLClientError):
    """The model's config or outputs do not match what this client expects (tasks, tensors, parameters)."""


class OutputError(MTLClientError):
    """The output files could not be written or put in place; `path` is the output file concerned."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


def text_error(index: int, reason: str) -> InvalidInputError:
    return InvalidInputError(f"texts[{index}]: {reason}", index=index, reason=reason)


def _host_port(url: str) -> tuple[str, int] | None:
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def speaks_tls(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at host:port completes a TLS handshake (certificate not checked: only the protocol)."""
    address = _host_port(url)
    if address is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(address, timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=address[0]),
        ):
            return True
    except (OSError, ValueError):
        return False


def _tls_error(status: str, message: str, url: str, tls: bool | None) -> TlsMismatchError | None:
    if status != "UNAVAILABLE":
        return None
    if _NOT_TLS.search(message):
        return TlsMismatchError(
            f"server at {url} is unavailable over TLS: it does not speak TLS (the handshake failed with "
            f"WRONG_VERSION_NUMBER); connect without --ssl and the certificate options (ssl=False)"
        )
    untrusted = _UNTRUSTED.search(message)
    if untrusted:
        return TlsMismatchError(
            f"server at {url} is unavailable over TLS: its certificate is not trusted ({untrusted.group(1).strip()}); "
            f"pass the CA that signed it with --root-certificates CA.pem (root_certificates=)"
        )
    # A TLS server closes a plaintext connection without a word: only a handshake of our own tells them apart.
    if _SOCKET_CLOSED.search(message) and speaks_tls(url):
        if tls is None:
            advice = (
                "a plaintext client needs --ssl (with --root-certificates CA.pem for a private CA); "
                "a TLS client may lack the client certificate it requires (--private-key, --certificate-chain)"
            )
        elif tls:
            advice = "it may require a client certificate: pass --private-key and --certificate-chain"
        else:
            advice = "connect with --ssl (with --root-certificates CA.pem for a private CA), or ssl=True"
        return TlsMismatchError(
            f"server at {url} is unavailable: it serves gRPC over TLS and closed the connection; {advice}"
        )
    return None


def translate(
    error: InferenceServerException, *, url: str, model: str, rows: Sequence[int] | None = None, tls: bool | None = None
) -> MTLClientError:
    """Map a tritonclient exception to this package's tree.

    `rows` are the caller-side indices of the rows of the failed request, so that the server's
    per-request "row 3: ..." becomes the caller's index. `tls` (whether the client used TLS, when
    known) sharpens the advice of a TLS mismatch.
    """
    status = (error.status() or "").removeprefix("StatusCode.")
    message = error.message() or str(error)
    tls_error = _tls_error(status, message, url, tls)
    if tls_error is not None:
        return tls_error
    # CANCELLED, and a model with "no available versions", are what a server that is shutting down or
    # restarting answers: as transient as a refused connection.
    if status in ("UNAVAILABLE", "CANCELLED") or (status == "NOT_FOUND" and "no available versions" in message):
        return ServerUnavailableError(f"server at {url} is unavailable: {message}")
    if status == "INTERNAL" and _STUB_UNHEALTHY.search(message):
        return ServerUnavailableError(
            f"server at {url} is unavailable: its model process died and is being restarted ({message})"
        )
    if status == "DEADLINE_EXCEEDED":
        return RequestTimeoutError(f"request to {url} timed out ({message})")
    if status == "NOT_FOUND":
        return ModelNotFoundError(f"server at {url} does not serve model '{model}': {message}")
    if status == "INVALID_ARGUMENT":
        match = _ROW_MESSAGE.match(message)
        if match and rows is not None and int(match.group(1)) < len(rows):
            return text_error(rows[int(match.group(1))], match.group(2))
        return InvalidInputError(f"server refused the request: {message}", reason=message)
    if status == "RESOURCE_EXHAUSTED":
        return InvalidInputError(f"request too large for the server at {url}: {message}", reason=message)
    return ServerError(f"server at {url} failed ({status or 'client error'}): {message}")


def is_transient(error: MTLClientError) -> bool:
    return isinstance(error, ServerUnavailableError) and not isinstance(error, TlsMismatchError)


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): exponential, capped, with equal jitter."""
    ceiling = min(cap_s, base_s * (2**attempt))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
