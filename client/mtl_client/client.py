"""MultiTaskClient: the synchronous client, several gRPC requests in flight from a thread pool."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .base import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    ClientSettings,
    Health,
    ModelInfo,
    checked_texts,
    list_batches,
    no_endpoint_answered,
)
from .batching import DEFAULT_MAX_REQUEST_BYTES, Batch, check_texts, plan_batches, stream_batches
from .contract import ModelContract
from .endpoints import Attempts, Endpoint, EndpointPool
from .errors import ModelContractError, MTLClientError, RequestTimeoutError, ServerUnavailableError, translate
from .predictions import Prediction


class MultiTaskClient:
    """Synchronous client of the multi-task model; use it as a context manager.

    Tasks, labels and limits are read from the server's model config on first use. `concurrency`
    requests are kept in flight so that the server's dynamic batcher gets full batches; results come
    back in input order. Calls that fail with UNAVAILABLE are retried `retries` times with
    exponential backoff and jitter; `timeout_s` bounds each call. `headers` go with every call.

    `url` may name several replicas (a list, or "host1:8001,host2:8001"): requests go round robin over
    the healthy ones, and one that fails is taken out and probed with a health call before it gets traffic
    again, while its requests move to the others (see mtl_client.endpoints). Every replica must serve the
    same model contract. `channel_args` are extra gRPC channel options, e.g.
    {"grpc.lb_policy_name": "round_robin"} for a `dns:///` name with several addresses.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        headers: Mapping[str, str] | None = None,
        concurrency: int = 4,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        channel_args: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
    ):
        self.settings = ClientSettings(
            url,
            model,
            timeout_s=timeout_s,
            retries=retries,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
            concurrency=concurrency,
            max_request_bytes=max_request_bytes,
            channel_args=channel_args,
        )
        self._endpoints = EndpointPool(self.settings.urls, self.settings.backoff_s, self.settings.max_backoff_s)
        try:
            for endpoint in self._endpoints:
                endpoint.client = grpcclient.InferenceServerClient(**self.settings.grpc_arguments(endpoint.url))
        except Exception as exc:  # bad TLS material or url; tritonclient raises plain errors
            self._close_channels()
            raise MTLClientError(f"cannot create a gRPC client for {endpoint.url}: {exc}") from exc
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._contract: ModelContract | None = None

    @property
    def url(self) -> str:
        """The endpoint, or the endpoints joined by commas."""
        return self.settings.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self.settings.urls

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- life cycle ----------------------------------------------------------------------------------
    def __enter__(self) -> MultiTaskClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is in flight and release the channels and threads."""
        if self._closed.is_set():
            return
        self._closed.set()
        # Closing the channels ends in-flight RPCs at once, so the workers finish quickly.
        self._close_channels()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _close_channels(self) -> None:
        for endpoint in self._endpoints:
            if endpoint.client is not None:
                endpoint.client.close()

    # -- the one boundary with tritonclient ----------------------------------------------------------
    def _call(self, method: str, *args, **kwargs) -> Any:
        """The result of `_request`, whichever endpoint answered."""
        return self._request(method, *args, **kwargs)[1]

    def _request(
        self,
        method: str,
        *args,
        rows=None,
        retries: int | None = None,
        timeout_s: float | None = None,
        only: Endpoint | None = None,
        **kwargs,
    ) -> tuple[Endpoint, Any]:
        """(endpoint that answered, its result); retries, failover and probes as decided by Attempts."""
        s = self.settings
        attempts = Attempts(self._endpoints, s.retries if retries is None else retries, only)
        while True:
            if self._closed.is_set():
                raise MTLClientError("the client is closed")
            step = attempts.next()
            if step.endpoint is None:
                if self._closed.wait(step.wait_s):
                    raise MTLClientError("the client was closed while waiting to retry")
                continue
            endpoint = step.endpoint
            if step.probe:
                error = self._probe(endpoint)
                if error is not None:
                    attempts.probe_failed(endpoint, error)
                    continue
            try:
                result = getattr(endpoint.client, method)(
                    *args, headers=s.headers, client_timeout=timeout_s or s.timeout_s, **kwargs
                )
            except InferenceServerException as exc:
                error = translate(exc, url=endpoint.url, model=s.model, rows=rows)
                if self._closed.is_set():
                    raise error from exc
                attempts.failed(endpoint, error, exc)
                continue
            except ValueError as exc:  # grpc refuses calls on a channel closed under it
                if self._closed.is_set():
                    raise MTLClientError("the client was closed during the call") from exc
                raise
            attempts.succeeded(endpoint)
            return endpoint, result

    def _probe(self, endpoint: Endpoint) -> MTLClientError | None:
        """Health (and, once, the model contract) of a replica before it gets traffic; None when it may."""
        healthy = False
        try:
            health = self._endpoint_health(endpoint, timeout_s=self.settings.probe_timeout_s, retries=0)
            if not health.ok:
                return ServerUnavailableError(f"server at {endpoint.url} is not ready ({health.describe()})")
            if self._endpoints.needs_verifying(endpoint):
                config = self._call(
                    "get_model_config",
                    self.model,
                    as_json=True,
                    only=endpoint,
                    retries=0,
                    timeout_s=self.settings.probe_timeout_s,
                )
                self._endpoints.verify(endpoint, ModelContract.from_model_config(config, self.model))
            healthy = True
            return None
        except ModelContractError:
            raise
        except MTLClientError as exc:  # any other failed check keeps it out of rotation, not the run
            return exc
        finally:
            self._endpoints.probed(endpoint, healthy)

    # -- server and model status ---------------------------------------------------------------------
    def _endpoint_health(
        self, endpoint: Endpoint, timeout_s: float | None = None, retries: int | None = None
    ) -> Health:
        call = {"timeout_s": timeout_s, "retries": retries, "only": endpoint}
        live = self._call("is_server_live", **call)
        ready = self._call("is_server_ready", **call)
        model_ready = self._call("is_model_ready", self.model, **call)
        return Health(endpoint.url, self.model, bool(live), bool(ready), bool(model_ready))

    def health(self, timeout_s: float | None = None, retries: int | None = None) -> Health:
        """Server live / ready and model ready; raises ServerUnavailableError if it cannot be reached.

        With several endpoints: the first that is ready, else the first that answered; the error only when
        none answered."""
        answered, errors = [], []
        for endpoint in self._endpoints:
            try:
                health = self._endpoint_health(endpoint, timeout_s, retries)
            except (ServerUnavailableError, RequestTimeoutError) as exc:
                if len(self._endpoints) == 1:
                    raise
                errors.append(exc)
                continue
            if health.ok:
                return health
            answered.append(health)
        if answered:
            return answered[0]
        raise no_endpoint_answered(self._endpoints.names, errors) from errors[0]

    def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.5) -> Health:
        """Poll until the server and the model are ready (on one endpoint at least), or raise
        ServerUnavailableError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = "not ready"
        while True:
            remaining = deadline - time.monotonic()
            try:
                call_timeout = max(min(remaining, self.settings.timeout_s or remaining), 0.1)
                health = self.health(timeout_s=call_timeout, retries=0)
                if health.ok:
                    return health
                last = health.describe()
            except (ServerUnavailableError, RequestTimeoutError) as exc:
                last = str(exc)
            if remaining <= 0 or self._closed.wait(min(interval_s, max(remaining, 0))):
                raise ServerUnavailableError(
                    f"model '{self.model}' at {self.url} not ready after {timeout_s:g}s ({last})"
                )

    def get_contract(self, refresh: bool = False) -> ModelContract:
        """Tasks, labels, tensor names and limits, read once from the server's model config.

        With several endpoints the others are checked at once (a replica that answers with another
        contract raises ModelContractError naming it); one that does not answer is checked when it is probed."""
        with self._lock:
            if self._contract is None or refresh:
                endpoint, config = self._request("get_model_config", self.model, as_json=True)
                contract = ModelContract.from_model_config(config, self.model)
                self._endpoints.set_contract(contract, endpoint)
                for other in self._endpoints:
                    if self._endpoints.needs_verifying(other) and not other.down:
                        self._probe(other)
                self._contract = contract
            return self._contract

    def info(self) -> ModelInfo:
        contract = self.get_contract()
        server = self._call("get_server_metadata", as_json=True)
        model = self._call("get_model_metadata", self.model, as_json=True)
        return ModelInfo(
            contract,
            server.get("name", ""),
            server.get("version", ""),
            tuple(model.get("versions", ())),
            model.get("platform", ""),
        )

    # -- prediction ----------------------------------------------------------------------------------
    def predict(self, texts: Iterable[str], batch_size: int = 64) -> list[Prediction]:
        """One Prediction per text, in input order. Every text is checked before anything is sent."""
        texts = list(texts)
        encoded = check_texts(texts)
        if not texts:
            return []
        contract = self.get_contract()
        ranges = plan_batches(encoded, self.settings.max_rows(batch_size, contract), self.settings.max_request_bytes)
        predictions: list[Prediction] = []
        for _, batch_predictions in self._run(list_batches(texts, encoded, ranges)):
            predictions.extend(batch_predictions)
        return predictions

    def predict_iter(self, texts: Iterable[str], batch_size: int = 64) -> Iterator[Prediction]:
        """Stream predictions in input order while reading `texts` lazily; at most 2 x concurrency batches
        are held at once. A bad text raises InvalidInputError naming its index when it is reached."""
        for _, prediction in self.predict_items(checked_texts(texts), batch_size):
            yield prediction

    def predict_items(
        self, items: Iterable[tuple[Any, str | None]], batch_size: int = 64
    ) -> Iterator[tuple[Any, Prediction | None]]:
        """Like predict_iter over (tag, text) pairs, yielding (tag, prediction) in input order.

        An item whose text is None is not sent; it comes back as (tag, None) in its place.
        """
        contract = self.get_contract()
        max_rows = self.settings.max_rows(batch_size, contract)
        for batch, predictions in self._run(stream_batches(items, max_rows, self.settings.max_request_bytes)):
            results = iter(predictions)
            for tag, text in zip(batch.tags, batch.texts, strict=True):
                yield tag, (None if text is None else next(results))

    def _infer(self, batch: Batch) -> list[Prediction]:
        contract = self.get_contract()
        inputs, outputs = contract.request(batch.encoded)
        result = self._call("infer", self.model, inputs, outputs=outputs, rows=batch.sent)
        return contract.decode(result.as_numpy, batch.sent_texts)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed.is_set():
                raise MTLClientError("the client is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="mtl-client")
            return self._pool

    def _run(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[Prediction]]]:
        """Send batches `concurrency` at a time, reading ahead a bounded window; yield results in order."""
        pool = self._executor()
        window: deque[tuple[Batch, Future | None]] = deque()
        try:
            for batch in batches:
                window.append((batch, pool.submit(self._infer, batch) if batch.sent else None))
                if len(window) >= self.settings.window:
                    yield _done(window.popleft())
            while window:
                yield _done(window.popleft())
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()


def _done(entry: tuple[Batch, Future | None]) -> tuple[Batch, list[Prediction]]:
    batch, future = entry
    return batch, (future.result() if future is not None else [])
