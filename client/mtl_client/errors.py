"""The client's one error tree, and the one place tritonclient's exceptions are translated into it."""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from tritonclient.utils import InferenceServerException

# The served model names the offending row of its own request: "row 3: empty text".
_ROW_MESSAGE = re.compile(r"^row (\d+): (.*)$", re.DOTALL)


class MTLClientError(Exception):
    """Base of every error this package raises."""


class ServerUnavailableError(MTLClientError):
    """The server cannot be reached, or said UNAVAILABLE (after the configured retries)."""


class RequestTimeoutError(MTLClientError):
    """A call did not finish within the client's timeout (gRPC DEADLINE_EXCEEDED)."""


class InvalidInputError(MTLClientError):
    """An input text was refused, by the client's checks or by the server (INVALID_ARG).

    `index` is the 0-based position of the (first) offending text in the caller's input when it is
    known, `indices` the first few of them, `count` how many there are in all, `reason` the problem alone.
    """

    def __init__(self, message: str, *, index: int | None = None, indices: Sequence[int] = (), count: int | None = None,
                 reason: str | None = None):
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


def text_error(index: int, reason: str) -> InvalidInputError:
    return InvalidInputError(f"texts[{index}]: {reason}", index=index, reason=reason)


def translate(error: InferenceServerException, *, url: str, model: str,
              rows: Sequence[int] | None = None) -> MTLClientError:
    """Map a tritonclient exception to this package's tree.

    `rows` are the caller-side indices of the rows of the failed request, so that the server's
    per-request "row 3: ..." becomes the caller's index.
    """
    status = (error.status() or "").removeprefix("StatusCode.")
    message = error.message() or str(error)
    # CANCELLED, and a model with "no available versions", are what a server that is shutting down or
    # restarting answers: as transient as a refused connection.
    if status in ("UNAVAILABLE", "CANCELLED") or (status == "NOT_FOUND" and "no available versions" in message):
        return ServerUnavailableError(f"server at {url} is unavailable: {message}")
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
    return isinstance(error, ServerUnavailableError)


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): exponential, capped, with equal jitter."""
    ceiling = min(cap_s, base_s * (2 ** attempt))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
