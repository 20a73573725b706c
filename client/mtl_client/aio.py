"""AsyncMultiTaskClient: the asyncio twin of MultiTaskClient over tritonclient.grpc.aio."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tritonclient.grpc.aio as aioclient
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
from .batching import DEFAULT_MAX_REQUEST_BYTES, Batch, BatchBuilder, check_texts, plan_batches
from .contract import ModelContract
from .endpoints import Attempts, Endpoint, EndpointPool
from .errors import (
    ModelContractError,
    MTLClientError,
    RequestTimeoutError,
    ServerUnavailableError,
    text_error,
    translate,
)
from .predictions import Prediction


class AsyncMultiTaskClient:
    """Asynchronous client with the surface of MultiTaskClient; use it as `async with`.

    Methods are coroutines, `predict_iter` and `predict_items` are async generators. The gRPC channels are
    made on first use inside the running event loop, and belong to that loop. Several endpoints, retries,
    failover and probes behave as in MultiTaskClient (the decision is shared: mtl_client.endpoints).
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
        self._connected = False
        self._closed = False
        self._contract: ModelContract | None = None
        self._contract_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None

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

    # -- life cycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncMultiTaskClient:
        self._connect()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for endpoint in self._endpoints:
            if endpoint.client is not None:
                await endpoint.client.close()

    def _connect(self) -> None:
        if self._closed:
            raise MTLClientError("the client is closed")
        if self._connected:
            return
        for endpoint in self._endpoints:
            try:
                endpoint.client = aioclient.InferenceServerClient(**self.settings.grpc_arguments(endpoint.url))
            except Exception as exc:  # bad TLS material or url; tritonclient raises plain errors
                raise MTLClientError(f"cannot create a gRPC client for {endpoint.url}: {exc}") from exc
        self._contract_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._connected = True

    # -- the one boundary with tritonclient ----------------------------------------------------------
    async def _call(self, method: str, *args, **kwargs) -> Any:
        """The result of `_request`, whichever endpoint answered."""
        return (await self._request(method, *args, **kwargs))[1]

    async def _request(
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
            self._connect()
            step = attempts.next()
            if step.endpoint is None:
                await asyncio.sleep(step.wait_s)
                continue
            endpoint = step.endpoint
            if step.probe:
                error = await self._probe(endpoint)
                if error is not None:
                    attempts.probe_failed(endpoint, error)
                    continue
            try:
                result = await getattr(endpoint.client, method)(
                    *args, headers=s.headers, client_timeout=timeout_s or s.timeout_s, **kwargs
                )
            except InferenceServerException as exc:
                error = translate(exc, url=endpoint.url, model=s.model, rows=rows)
                if self._closed:
                    raise error from exc
                attempts.failed(endpoint, error, exc)
                continue
            attempts.succeeded(endpoint)
            return endpoint, result

    async def _probe(self, endpoint: Endpoint) -> MTLClientError | None:
        """Health (and, once, the model contract) of a replica before it gets traffic; None when it may."""
        healthy = False
        try:
            health = await self._endpoint_health(endpoint, timeout_s=self.settings.probe_timeout_s, retries=0)
            if not health.ok:
                return ServerUnavailableError(f"server at {endpoint.url} is not ready ({health.describe()})")
            if self._endpoints.needs_verifying(endpoint):
                config = await self._call(
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
    async def _endpoint_health(
        self, endpoint: Endpoint, timeout_s: float | None = None, retries: int | None = None
    ) -> Health:
        call = {"timeout_s": timeout_s, "retries": retries, "only": endpoint}
        live = await self._call("is_server_live", **call)
        ready = await self._call("is_server_ready", **call)
        model_ready = await self._call("is_model_ready", self.model, **call)
        return Health(endpoint.url, self.model, bool(live), bool(ready), bool(model_ready))

    async def health(self, timeout_s: float | None = None, retries: int | None = None) -> Health:
        """As MultiTaskClient.health: with several endpoints, the first ready one."""
        answered, errors = [], []
        for endpoint in self._endpoints:
            try:
                health = await self._endpoint_health(endpoint, timeout_s, retries)
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

    async def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.5) -> Health:
        deadline = time.monotonic() + timeout_s
        last = "not ready"
        while True:
            remaining = deadline - time.monotonic()
            try:
                health = await self.health(
                    timeout_s=max(min(remaining, self.settings.timeout_s or remaining), 0.1), retries=0
                )
                if health.ok:
                    return health
                last = health.describe()
            except (ServerUnavailableError, RequestTimeoutError) as exc:
                last = str(exc)
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"model '{self.model}' at {self.url} not ready after {timeout_s:g}s ({last})"
                )
            await asyncio.sleep(min(interval_s, remaining))

    async def get_contract(self, refresh: bool = False) -> ModelContract:
        """As MultiTaskClient.get_contract: read once, and the same on every endpoint."""
        self._connect()
        async with self._contract_lock:
            if self._contract is None or refresh:
                endpoint, config = await self._request("get_model_config", self.model, as_json=True)
                contract = ModelContract.from_model_config(config, self.model)
                self._endpoints.set_contract(contract, endpoint)
                for other in self._endpoints:
                    if self._endpoints.needs_verifying(other) and not other.down:
                        await self._probe(other)
                self._contract = contract
            return self._contract

    async def info(self) -> ModelInfo:
        contract = await self.get_contract()
        server = await self._call("get_server_metadata", as_json=True)
        model = await self._call("get_model_metadata", self.model, as_json=True)
        return ModelInfo(
            contract,
            server.get("name", ""),
            server.get("version", ""),
            tuple(model.get("versions", ())),
            model.get("platform", ""),
        )

    # -- prediction ----------------------------------------------------------------------------------
    async def predict(self, texts: Iterable[str], batch_size: int = 64) -> list[Prediction]:
        texts = list(texts)
        encoded = check_texts(texts)
        if not texts:
            return []
        contract = await self.get_contract()
        ranges = plan_batches(encoded, self.settings.max_rows(batch_size, contract), self.settings.max_request_bytes)
        predictions: list[Prediction] = []
        async for _, batch_predictions in self._run(_aiter(list_batches(texts, encoded, ranges))):
            predictions.extend(batch_predictions)
        return predictions

    async def predict_iter(
        self, texts: Iterable[str] | AsyncIterable[str], batch_size: int = 64
    ) -> AsyncIterator[Prediction]:
        """Async generator of predictions in input order; `texts` may be a sync or an async iterable."""
        items = _acheck(texts) if isinstance(texts, AsyncIterable) else _aiter(checked_texts(texts))
        async for _, prediction in self.predict_items(items, batch_size):
            yield prediction

    async def predict_items(
        self, items: Iterable[tuple[Any, str | None]] | AsyncIterable[tuple[Any, str | None]], batch_size: int = 64
    ) -> AsyncIterator[tuple[Any, Prediction | None]]:
        contract = await self.get_contract()
        builder = BatchBuilder(self.settings.max_rows(batch_size, contract), self.settings.max_request_bytes)
        source = items if isinstance(items, AsyncIterable) else _aiter(items)
        async for batch, predictions in self._run(_batches(source, builder)):
            results = iter(predictions)
            for tag, text in zip(batch.tags, batch.texts, strict=True):
                yield tag, (None if text is None else next(results))

    async def _infer(self, batch: Batch) -> list[Prediction]:
        contract = await self.get_contract()
        inputs, outputs = contract.request(batch.encoded)
        async with self._slots:
            result = await self._call("infer", self.model, inputs, outputs=outputs, rows=batch.sent)
        return contract.decode(result.as_numpy, batch.sent_texts)

    async def _run(self, batches: AsyncIterator[Batch]) -> AsyncIterator[tuple[Batch, list[Prediction]]]:
        window: deque[tuple[Batch, asyncio.Task | None]] = deque()
        try:
            async for batch in batches:
                window.append((batch, asyncio.ensure_future(self._infer(batch)) if batch.sent else None))
                if len(window) >= self.settings.window:
                    yield await _done(window.popleft())
            while window:
                yield await _done(window.popleft())
        finally:
            pending = [task for _, task in window if task is not None]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


async def _done(entry: tuple[Batch, asyncio.Task | None]) -> tuple[Batch, list[Prediction]]:
    batch, task = entry
    return batch, (await task if task is not None else [])


async def _aiter(items: Iterable) -> AsyncIterator:
    for item in items:
        yield item


async def _acheck(texts: AsyncIterable[str]) -> AsyncIterator[tuple[None, str]]:
    index = 0
    async for text in texts:
        if text is None:
            raise text_error(index, "expected a str, got None")
        yield None, text
        index += 1


async def _batches(items: AsyncIterator[tuple[Any, str | None]], builder: BatchBuilder) -> AsyncIterator[Batch]:
    async for tag, text in items:
        batch = builder.add(tag, text)
        if batch is not None:
            yield batch
    batch = builder.finish()
    if batch is not None:
        yield batch
