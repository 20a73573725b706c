"""Several Triton endpoints behind one client, and the retry decision both clients share.

Calls go round robin over the healthy endpoints. An endpoint whose call fails with a transient error is
taken out; once its backoff has passed, one caller probes it with a health call (and checks its model
contract) before it gets traffic again, while the failed call moves on to another endpoint. A call gives
up only when every endpoint has failed it `retries` + 1 times over, with backoff between the rounds.
One endpoint behaves as a plain retry loop: it is never taken out, the call is simply retried.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .contract import ModelContract
from .errors import ModelContractError, MTLClientError, backoff_delay, is_transient


@dataclass(eq=False)
class Endpoint:
    """One gRPC target and its state; `client` is the tritonclient object (sync or aio) for it."""

    url: str
    client: Any = None
    failures: int = 0  # consecutive failures: 0 while it is healthy
    retry_at: float = 0.0  # monotonic time from which it may be probed again
    probing: bool = False
    verified: bool = False  # its model contract was found equal to the client's

    @property
    def down(self) -> bool:
        return self.failures > 0


@dataclass(frozen=True)
class Step:
    """What a client does next for one call: wait `wait_s`, or (probe and) call `endpoint`."""

    endpoint: Endpoint | None
    probe: bool = False
    wait_s: float = 0.0


class EndpointPool:
    """The endpoints of one client: round robin, take-out on failure, and probes with backoff."""

    def __init__(
        self,
        urls: Iterable[str],
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.endpoints = [Endpoint(url) for url in urls]
        if not self.endpoints:
            raise MTLClientError("no server url given")
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.contract: ModelContract | None = None
        self._source: Endpoint | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0

    def __len__(self) -> int:
        return len(self.endpoints)

    def __iter__(self):
        return iter(self.endpoints)

    @property
    def names(self) -> str:
        return ", ".join(e.url for e in self.endpoints)

    def choose(self, exclude: set[Endpoint]) -> tuple[Endpoint, bool] | None:
        """The next endpoint in rotation not in `exclude`, and whether it is to be probed first; None when
        every endpoint is down (and not yet due for a probe) or excluded."""
        if len(self.endpoints) == 1:
            only = self.endpoints[0]
            return None if only in exclude else (only, False)
        with self._lock:
            now = self._clock()
            count = len(self.endpoints)
            for offset in range(count):
                index = (self._next + offset) % count
                endpoint = self.endpoints[index]
                if endpoint in exclude:
                    continue
                if endpoint.down:
                    if endpoint.probing or now < endpoint.retry_at:
                        continue
                    # One caller probes it; the others keep going round the healthy ones.
                    endpoint.probing = True
                self._next = index + 1
                return endpoint, endpoint.probing or self.needs_verifying(endpoint)
        return None

    def soonest(self) -> Endpoint:
        """The endpoint to retry when none is healthy: the one whose backoff ends first."""
        with self._lock:
            return min(self.endpoints, key=lambda e: (e.down, e.retry_at))

    def needs_verifying(self, endpoint: Endpoint) -> bool:
        return len(self.endpoints) > 1 and self.contract is not None and not endpoint.verified

    def failed(self, endpoint: Endpoint) -> None:
        """A call on `endpoint` failed with a transient error: take it out (calls already in flight on it
        that fail too do not push its probe further out)."""
        if len(self.endpoints) == 1:
            return
        with self._lock:
            if not endpoint.down:
                endpoint.failures = 1
                endpoint.retry_at = self._clock() + self._delay(1)

    def succeeded(self, endpoint: Endpoint) -> None:
        if endpoint.failures:
            with self._lock:
                endpoint.failures = 0

    def probed(self, endpoint: Endpoint, healthy: bool) -> None:
        """Record a probe's outcome: back in rotation, or out for a longer backoff."""
        with self._lock:
            endpoint.probing = False
            endpoint.failures = 0 if healthy else endpoint.failures + 1
            if not healthy:
                endpoint.retry_at = self._clock() + self._delay(endpoint.failures)

    def _delay(self, failures: int) -> float:
        return backoff_delay(failures - 1, self.backoff_s, self.max_backoff_s)

    # -- the model contract, the same on every endpoint ----------------------------------------------
    def set_contract(self, contract: ModelContract, source: Endpoint) -> None:
        """The contract the client works with, read from `source`; the other endpoints are checked against it."""
        with self._lock:
            if contract != self.contract:
                for endpoint in self.endpoints:
                    endpoint.verified = False
            self.contract, self._source = contract, source
            source.verified = True

    def verify(self, endpoint: Endpoint, contract: ModelContract) -> None:
        """Raise ModelContractError naming `endpoint` if it serves another contract than the client's."""
        if self.contract is None:
            raise MTLClientError("the model contract has not been read yet")
        if contract != self.contract:
            source = self._source.url if self._source else "the first endpoint"
            raise ModelContractError(
                f"replica {endpoint.url} serves a different model contract than {source}: "
                f"{contract_difference(self.contract, contract)}; every endpoint must serve the same model"
            )
        endpoint.verified = True


class Attempts:
    """The retry decision of one call, shared by the sync and async clients.

    Drive it with `next()`: a Step with an endpoint is to be called (probed first when `probe`), a Step
    without one is a backoff to wait. Report the outcome with `succeeded`, `failed` or `probe_failed`;
    `failed` raises the error when it is not transient, and `next()` raises the give-up error once every
    endpoint has failed `retries` + 1 rounds. `only` pins the call to one endpoint (health and probes).
    """

    def __init__(self, pool: EndpointPool, retries: int, only: Endpoint | None = None):
        self.pool, self.retries, self.only = pool, retries, only
        self.retry = 0
        self._tried: set[Endpoint] = set()
        self._waited = False
        self._error: MTLClientError | None = None
        self._cause: BaseException | None = None

    def next(self) -> Step:
        if self.only is not None:
            if self.only not in self._tried:
                return Step(self.only)
        elif self._waited or self._error is None:
            # After a backoff, or first of all: a healthy endpoint, else the one most likely back by now.
            choice = self.pool.choose(set() if self._waited else self._tried)
            if choice is None:
                endpoint = self.pool.soonest()
                choice = (endpoint, self.pool.needs_verifying(endpoint))
            self._waited = False
            return Step(*choice)
        else:
            choice = self.pool.choose(self._tried)
            if choice is not None:
                return Step(*choice)
        if self.retry >= self.retries:
            raise self._give_up() from self._cause
        wait = backoff_delay(self.retry, self.pool.backoff_s, self.pool.max_backoff_s)
        self.retry += 1
        self._tried.clear()
        self._waited = True
        return Step(None, wait_s=wait)

    def succeeded(self, endpoint: Endpoint) -> None:
        self.pool.succeeded(endpoint)

    def failed(self, endpoint: Endpoint, error: MTLClientError, cause: BaseException) -> None:
        """A call on `endpoint` failed with `error` (translated from `cause`): raise it unless it is transient."""
        if not is_transient(error):
            raise error from cause
        if self.only is None:
            self.pool.failed(endpoint)
        self._tried.add(endpoint)
        self._error, self._cause = error, cause

    def probe_failed(self, endpoint: Endpoint, error: MTLClientError) -> None:
        self._tried.add(endpoint)
        if self._error is None:
            self._error, self._cause = error, error.__cause__

    def _give_up(self) -> MTLClientError:
        error = self._error or MTLClientError("no endpoint could be tried")
        message = str(error)
        if self.only is None and len(self.pool) > 1:
            message = f"every endpoint is unavailable ({self.pool.names}); last error: {message}"
        if self.retry:
            message = f"{message} (gave up after {self.retry} retries)"
        return error if message == str(error) else type(error)(message)


def split_urls(urls: str | Iterable[str]) -> list[str]:
    """`a:1,b:2`, ["a:1", "b:2"] or a mix, as a list; a gRPC target with a scheme (`ipv4:a:1,b:2`) stays whole."""
    if isinstance(urls, str):
        urls = [urls]
    parts = []
    for url in urls:
        url = (url or "").strip()
        if _has_grpc_scheme(url):
            parts.append(url)
        else:
            parts.extend(part.strip() for part in url.split(","))
    return parts


GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def _has_grpc_scheme(url: str) -> bool:
    return url.startswith(GRPC_SCHEMES)


def contract_difference(expected: ModelContract, found: ModelContract) -> str:
    """What differs between two contracts, field by field, for an error message."""

    def shown(value):
        if isinstance(value, tuple) and value and hasattr(value[0], "labels"):
            return "; ".join(f"{task.name}: {', '.join(task.labels)}" for task in value)
        return repr(value)

    parts = [
        f"{field.name} {shown(getattr(found, field.name))} instead of {shown(getattr(expected, field.name))}"
        for field in dataclasses.fields(expected)
        if getattr(found, field.name) != getattr(expected, field.name)
    ]
    return ", ".join(parts) or "the contracts differ"
