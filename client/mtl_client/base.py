"""What the sync and async clients share: settings, their checks, and the server-status types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

from .batching import DEFAULT_MAX_REQUEST_BYTES, ELEMENT_OVERHEAD, Batch
from .contract import ModelContract
from .endpoints import GRPC_SCHEMES, split_urls
from .errors import MTLClientError, text_error

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "multitask"


@dataclass(frozen=True)
class Health:
    url: str
    model: str
    live: bool
    ready: bool
    model_ready: bool

    @property
    def ok(self) -> bool:
        return self.live and self.ready and self.model_ready

    def describe(self) -> str:
        return f"live={self.live} ready={self.ready} model ready={self.model_ready}"


@dataclass(frozen=True)
class ModelInfo:
    contract: ModelContract
    server_name: str
    server_version: str
    model_versions: tuple[str, ...] = ()
    platform: str = ""

    def to_dict(self) -> dict:
        c = self.contract
        return {
            "server": {"name": self.server_name, "version": self.server_version},
            "model": {
                "name": c.model,
                "versions": list(self.model_versions),
                "platform": self.platform,
                "input": c.input_name,
                "max_batch_size": c.max_batch_size,
                "max_tokens": c.max_tokens,
                "truncated_output": c.truncated_output,
                "output_filename": c.output_filename,
            },
            "tasks": [{"name": t.name, "labels": list(t.labels)} for t in c.tasks],
        }


def normalize_url(url: str) -> str:
    """host:port for gRPC; a grpc:// prefix is accepted, an HTTP url is refused with a hint.

    A gRPC target with a scheme (`dns:///svc.ns:8001`, `ipv4:10.0.0.1:8001,10.0.0.2:8001`) is passed on
    as it is, for gRPC's own resolver and load-balancing policy.
    """
    url = (url or "").strip()
    if url.startswith("grpc://"):
        url = url[len("grpc://") :]
    if url.startswith(("http://", "https://")):
        raise MTLClientError(
            f"{url} is an HTTP url; mtl-client speaks gRPC: give host:port of the gRPC endpoint "
            f"(Triton's default is port 8001)"
        )
    if url.startswith(GRPC_SCHEMES):
        if not url.partition(":")[2].strip("/"):
            raise MTLClientError(f"bad gRPC target {url!r}: nothing after the scheme")
        return url
    if not url or "/" in url:
        raise MTLClientError(f"bad server url {url!r}: expected host:port, e.g. {DEFAULT_URL}")
    return url


def normalize_urls(urls: str | Iterable[str]) -> tuple[str, ...]:
    """Every endpoint of a comma list or a sequence of urls, normalized, in order; a repeat is an error."""
    found = tuple(normalize_url(url) for url in split_urls(urls))
    if not found:
        raise MTLClientError(f"no server url given, e.g. {DEFAULT_URL}")
    repeated = sorted({url for url in found if found.count(url) > 1})
    if repeated:
        raise MTLClientError(f"server url {', '.join(repeated)} is given twice")
    return found


def channel_arguments(extra: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """tritonclient's default channel options with `extra` on top: passing channel_args replaces them all."""
    keepalive = KeepAliveOptions()
    options = {
        "grpc.max_send_message_length": MAX_GRPC_MESSAGE_SIZE,
        "grpc.max_receive_message_length": MAX_GRPC_MESSAGE_SIZE,
        "grpc.keepalive_time_ms": keepalive.keepalive_time_ms,
        "grpc.keepalive_timeout_ms": keepalive.keepalive_timeout_ms,
        "grpc.keepalive_permit_without_calls": keepalive.keepalive_permit_without_calls,
        "grpc.http2.max_pings_without_data": keepalive.http2_max_pings_without_data,
    }
    options.update(extra)
    return list(options.items())


class ClientSettings:
    """Validated constructor arguments of both clients."""

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
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        channel_args: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
    ):
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_request_bytes <= ELEMENT_OVERHEAD:
            raise ValueError(f"max_request_bytes must be more than {ELEMENT_OVERHEAD}, got {max_request_bytes}")
        self.urls = normalize_urls(url)
        self.url = ",".join(self.urls)
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.concurrency = concurrency
        self.max_request_bytes = max_request_bytes
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        # gRPC metadata keys must be lowercase.
        self.headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()} or None
        tls = {
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
        }
        for name, path in tls.items():
            if path is not None and not Path(path).is_file():
                raise MTLClientError(f"TLS {name.replace('_', ' ')} file {path} does not exist")
        self.ssl = bool(ssl or any(tls.values()))
        self.tls = {k: (str(v) if v is not None else None) for k, v in tls.items()}
        # Batches read ahead of the results being consumed: enough to keep every request slot busy.
        self.window = 2 * concurrency
        self.channel_args = dict(channel_args.items() if isinstance(channel_args, Mapping) else channel_args or ())
        if not all(isinstance(name, str) and name for name in self.channel_args):
            raise ValueError(f"gRPC channel option names must be strings, got {list(self.channel_args)}")
        # A health probe is tiny: a replica that cannot answer one this fast gets no traffic yet.
        self.probe_timeout_s = min(timeout_s or 5.0, 5.0)

    def grpc_arguments(self, url: str | None = None) -> dict:
        """InferenceServerClient's arguments for one endpoint (the first by default)."""
        extra = dict(self.channel_args)
        if len(self.urls) > 1:
            # gRPC's own reconnect backoff (up to 120 s) would hide a replica that came back from the probes.
            extra.setdefault("grpc.initial_reconnect_backoff_ms", max(int(self.backoff_s * 1000), 1))
            extra.setdefault("grpc.max_reconnect_backoff_ms", max(int(self.max_backoff_s * 1000), 1))
        return {
            "url": url or self.urls[0],
            "ssl": self.ssl,
            **self.tls,
            "channel_args": channel_arguments(extra) if extra else None,
        }

    @staticmethod
    def max_rows(batch_size: int, contract: ModelContract) -> int:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return min(batch_size, contract.max_batch_size)


def no_endpoint_answered(names: str, errors: list[MTLClientError]) -> MTLClientError:
    """health()'s error when none of several endpoints answered: every endpoint's reason, in order."""
    return type(errors[0])(f"no endpoint answered ({names}): " + "; ".join(map(str, errors)))


def list_batches(texts: list, encoded: list[bytes], ranges: list[tuple[int, int]]):
    """Batches for an in-memory list, from plan_batches' ranges."""
    for start, stop in ranges:
        yield Batch(
            first=start,
            tags=[None] * (stop - start),
            texts=texts[start:stop],
            sent=list(range(start, stop)),
            encoded=encoded[start:stop],
        )


def checked_texts(texts):
    """predict_iter's input as (tag, text) items; None is an error there, not a pass-through."""
    for index, text in enumerate(texts):
        if text is None:
            raise text_error(index, "expected a str, got None")
        yield None, text
