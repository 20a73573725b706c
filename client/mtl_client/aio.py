"""AsyncMultiTaskClient: the asyncio twin of MultiTaskClient over tritonclient.grpc.aio."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from .base import DEFAULT_MODEL, DEFAULT_URL, ClientSettings, Health, ModelInfo, checked_texts, list_batches
from .batching import DEFAULT_MAX_REQUEST_BYTES, Batch, BatchBuilder, check_texts, plan_batches
from .contract import ModelContract
from .errors import (MTLClientError, RequestTimeoutError, ServerUnavailableError, backoff_delay, is_transient,
                     text_error, translate)
from .predictions import Prediction


class AsyncMultiTaskClient:
    """Asynchronous client with the surface of MultiTaskClient; use it as `async with`.

    Methods are coroutines, `predict_iter` and `predict_items` are async generators. The gRPC channel is
    made on first use inside the running event loop, and belongs to that loop.
    """

    def __init__(self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, *, timeout_s: float = 60.0,
                 retries: int = 3, ssl: bool = False, root_certificates: str | Path | None = None,
                 private_key: str | Path | None = None, certificate_chain: str | Path | None = None,
                 headers: Mapping[str, str] | None = None, concurrency: int = 4,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.settings = ClientSettings(
            url, model, timeout_s=timeout_s, retries=retries, ssl=ssl, root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, headers=headers,
            concurrency=concurrency, max_request_bytes=max_request_bytes,
        )
        self._grpc: aioclient.InferenceServerClient | None = None
        self._closed = False
        self._contract: ModelContract | None = None
        self._contract_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def model(self) -> str:
        return self.settings.model

    # -- life cycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> "AsyncMultiTaskClient":
        self._client()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._grpc is not None:
            await self._grpc.close()

    def _client(self) -> aioclient.InferenceServerClient:
        if self._closed:
            raise MTLClientError("the client is closed")
        if self._grpc is None:
            try:
                self._grpc = aioclient.InferenceServerClient(**self.settings.grpc_arguments())
            except Exception as exc:  # noqa: BLE001 - bad TLS material or url; tritonclient raises plain errors
                raise MTLClientError(f"cannot create a gRPC client for {self.url}: {exc}") from exc
            self._contract_lock = asyncio.Lock()
            self._slots = asyncio.Semaphore(self.settings.concurrency)
        return self._grpc

    # -- the one boundary with tritonclient ----------------------------------------------------------
    async def _call(self, method: str, *args, rows=None, retries: int | None = None,
                    timeout_s: float | None = None, **kwargs) -> Any:
        s = self.settings
        retries = s.retries if retries is None else retries
        for attempt in itertools.count():
            client = self._client()
            try:
                return await getattr(client, method)(*args, headers=s.headers,
                                                     client_timeout=timeout_s or s.timeout_s, **kwargs)
            except InferenceServerException as exc:
                error = translate(exc, url=s.url, model=s.model, rows=rows)
                if not is_transient(error) or attempt >= retries or self._closed:
                    if attempt and is_transient(error):
                        error = type(error)(f"{error} (gave up after {attempt} retries)")
                    raise error from exc
            await asyncio.sleep(backoff_delay(attempt, s.backoff_s, s.max_backoff_s))

    # -- server and model status ---------------------------------------------------------------------
    async def health(self, timeout_s: float | None = None, retries: int | None = None) -> Health:
        call = {"timeout_s": timeout_s, "retries": retries}
        live = await self._call("is_server_live", **call)
        ready = await self._call("is_server_ready", **call)
        model_ready = await self._call("is_model_ready", self.model, **call)
        return Health(self.url, self.model, bool(live), bool(ready), bool(model_ready))

    async def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.5) -> Health:
        deadline = time.monotonic() + timeout_s
        last = "not ready"
        while True:
            remaining = deadline - time.monotonic()
            try:
                health = await self.health(timeout_s=max(min(remaining, self.settings.timeout_s or remaining), 0.1),
                                           retries=0)
                if health.ok:
                    return health
                last = f"live={health.live} ready={health.ready} model ready={health.model_ready}"
            except (ServerUnavailableError, RequestTimeoutError) as exc:
                last = str(exc)
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"model '{self.model}' at {self.url} not ready after {timeout_s:g}s ({last})")
            await asyncio.sleep(min(interval_s, remaining))

    async def get_contract(self, refresh: bool = False) -> ModelContract:
        self._client()
        async with self._contract_lock:
            if self._contract is None or refresh:
                config = await self._call("get_model_config", self.model, as_json=True)
                self._contract = ModelContract.from_model_config(config, self.model)
            return self._contract

    async def info(self) -> ModelInfo:
        contract = await self.get_contract()
        server = await self._call("get_server_metadata", as_json=True)
        model = await self._call("get_model_metadata", self.model, as_json=True)
        return ModelInfo(contract, server.get("name", ""), server.get("version", ""),
                         tuple(model.get("versions", ())), model.get("platform", ""))

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

    async def predict_iter(self, texts: Iterable[str] | AsyncIterable[str], batch_size: int = 64
                           ) -> AsyncIterator[Prediction]:
        """Async generator of predictions in input order; `texts` may be a sync or an async iterable."""
        items = _acheck(texts) if isinstance(texts, AsyncIterable) else _aiter(checked_texts(texts))
        async for _, prediction in self.predict_items(items, batch_size):
            yield prediction

    async def predict_items(self, items: Iterable[tuple[Any, str | None]] | AsyncIterable[tuple[Any, str | None]],
                            batch_size: int = 64) -> AsyncIterator[tuple[Any, Prediction | None]]:
        contract = await self.get_contract()
        builder = BatchBuilder(self.settings.max_rows(batch_size, contract), self.settings.max_request_bytes)
        source = items if isinstance(items, AsyncIterable) else _aiter(items)
        async for batch, predictions in self._run(_batches(source, builder)):
            results = iter(predictions)
            for tag, text in zip(batch.tags, batch.texts):
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
