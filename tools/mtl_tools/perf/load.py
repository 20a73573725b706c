"""A concurrency sweep of perf_analyzer against a server whose model is proven READY and answering.

The target is either a server this tool starts through LocalTriton (which refuses a stub environment
with numpy>=2) or a running one given by its gRPC URL. Either way a real request goes through first,
and the model must still be READY, with no stub restart, after every perf_analyzer run.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from .analyzer import Measurement, PerfAnalyzer, PerfError, RunSettings, run
from .inputs import INPUT_NAME, write_input_data

SMOKE_TEXTS = ("The quarterly results beat every forecast.", "This update made my phone unbearably slow.")
WINDOW_REQUESTS = 4  # completed requests a measurement window should hold at least
MAX_WINDOW_MS = 30000


@dataclass(frozen=True)
class Workload:
    """Requests of `sentences` sentences each, at each concurrency in turn."""

    sentences: int
    concurrency: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str) -> Workload:
        """'64:1,2,4' → 64-sentence requests at concurrency 1, 2 and 4."""
        try:
            size, levels = spec.split(":", 1)
            workload = cls(int(size), tuple(int(c) for c in levels.split(",") if c.strip()))
        except ValueError:
            raise ValueError(f"{spec!r} is not SENTENCES:CONCURRENCY[,CONCURRENCY...] (e.g. 64:1,2,4)") from None
        if workload.sentences < 1 or not workload.concurrency or min(workload.concurrency) < 1:
            raise ValueError(f"{spec!r}: sentences and every concurrency must be >= 1")
        return workload


def _probabilities_ok(outputs: dict[str, list], rows: int) -> str | None:
    """None when every FP32 output holds `rows` probability rows summing to 1; else what is wrong."""
    tasks = {name: values for name, values in outputs.items() if name != "TRUNCATED"}
    if not tasks:
        return f"no task outputs (got {sorted(outputs)})"
    for name, values in tasks.items():
        if len(values) % rows:
            return f"output {name} has {len(values)} values for {rows} rows"
        width = len(values) // rows
        for row in range(rows):
            total = sum(values[row * width : (row + 1) * width])
            if abs(total - 1.0) > 1e-3:
                return f"output {name} row {row} sums to {total}"
    return None


class Target:
    """Where perf_analyzer sends requests, and how to tell that the model still works."""

    grpc_url: str
    model: str

    def infer(self, texts: list[str]) -> dict[str, list]:  # pragma: no cover - interface
        """One request of len(texts) rows: {output name: flat values}."""
        raise NotImplementedError

    def ready(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def where(self) -> str:
        return self.grpc_url

    def server_failure(self) -> str | None:
        """What went wrong with a server this tool started (a stub restart, an exit); None if nothing."""
        return None

    def check(self, texts: list[str]) -> None:
        """READY, and real answers to a 2-sentence and a 64-sentence request (which also warms the model up)."""
        if not self.ready():
            raise PerfError(
                f"model {self.model} is not READY at {self.where()} (or the server is unreachable): "
                "refusing to load-test it"
            )
        for batch in (list(SMOKE_TEXTS), texts[:64]):
            problem = _probabilities_ok(self.infer(batch), len(batch))
            if problem:
                raise PerfError(f"model {self.model} answered a smoke request wrongly: {problem}")

    def still_healthy(self) -> None:
        failure = self.server_failure()
        if failure:
            raise PerfError(f"the server failed during the run: {failure}")
        if not self.ready():
            raise PerfError(f"model {self.model} at {self.where()} is no longer READY")
        problem = _probabilities_ok(self.infer(list(SMOKE_TEXTS)), len(SMOKE_TEXTS))
        if problem:
            raise PerfError(f"model {self.model} answers wrongly after the run: {problem}")

    def request_seconds(self, texts: list[str], size: int) -> float:
        """The faster of two timed requests of `size` sentences (the model is warm after check())."""
        batch = (texts * (size // len(texts) + 1))[:size]
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            self.infer(batch)
            timings.append(time.perf_counter() - started)
        return min(timings)

    def describe(self) -> dict:
        return {"grpc_url": self.grpc_url, "model": self.model}


class LocalTarget(Target):
    """A server started by this tool through LocalTriton; checked over its HTTP endpoint (stdlib only)."""

    def __init__(self, server, model: str):
        self.server = server
        self.grpc_url = server.grpc_url
        self.model = model

    def infer(self, texts: list[str]) -> dict[str, list]:
        body = {"inputs": [{"name": INPUT_NAME, "shape": [len(texts), 1], "datatype": "BYTES", "data": list(texts)}]}
        request = urllib.request.Request(
            f"{self.server.http_url}/v2/models/{self.model}/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as exc:
            raise PerfError(
                f"model {self.model} refused a {len(texts)}-sentence request: HTTP {exc.code} {exc.read()[:300]!r}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise PerfError(f"model {self.model} did not answer a {len(texts)}-sentence request: {exc}") from None
        return {o["name"]: o["data"] for o in payload.get("outputs", [])}

    def ready(self) -> bool:
        return self.server.is_ready(self.model)

    def where(self) -> str:
        return self.server.http_url

    def server_failure(self) -> str | None:
        failure, restarts = getattr(self.server, "failure", None), getattr(self.server, "restarts", 0)
        if failure or restarts:
            return (
                f"{failure or f'{restarts} restart(s) after a python-backend stub died'} (log: {self.server.log_file})"
            )
        return None

    def describe(self) -> dict:
        return {
            **super().describe(),
            "server": "LocalTriton (Triton 2.51.0 from nvidia-pytriton)",
            "log": str(self.server.log_file),
        }


class RemoteTarget(Target):
    """A running server given by its gRPC URL; checked with tritonclient over gRPC."""

    def __init__(self, grpc_url: str, model: str):
        self.grpc_url = grpc_url
        self.model = model

    def _client(self):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise PerfError(
                "checking a server given by --url needs tritonclient[grpc]; "
                "or let the tool start one with --model-repository"
            ) from None
        return grpcclient

    def infer(self, texts: list[str]) -> dict[str, list]:
        import numpy as np

        grpcclient = self._client()
        from tritonclient.utils import InferenceServerException

        try:
            with grpcclient.InferenceServerClient(self.grpc_url) as client:
                tensor = grpcclient.InferInput(INPUT_NAME, [len(texts), 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
                result = client.infer(self.model, [tensor], client_timeout=120)
                names = [o["name"] for o in result.get_response(as_json=True)["outputs"]]
                return {name: result.as_numpy(name).reshape(-1).tolist() for name in names}
        except InferenceServerException as exc:
            # A stub whose environment has numpy>=2 dies on the first text request: INTERNAL / UNAVAILABLE.
            hint = (
                " (a python-backend stub whose environment has numpy>=2 fails every text request like this)"
                if "INVALID_ARG" not in str(exc.status())
                else ""
            )
            raise PerfError(
                f"model {self.model} at {self.grpc_url} failed a {len(texts)}-sentence request: "
                f"{exc.message()}{hint}; refusing to load-test it"
            ) from None

    def ready(self) -> bool:
        grpcclient = self._client()
        from tritonclient.utils import InferenceServerException

        try:
            with grpcclient.InferenceServerClient(self.grpc_url) as client:
                return client.is_server_live() and client.is_model_ready(self.model)
        except InferenceServerException:
            return False


@contextmanager
def local_target(
    repository: Path, model: str, log_file: Path, stub_python: Path | None = None, startup_timeout_s: float = 180.0
):
    """Start LocalTriton on free ports (it refuses a stub environment with numpy>=2); stop it afterwards."""
    from ..triton import LocalTriton, ServerError

    server = LocalTriton(
        repository,
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        log_file=log_file,
        stub_python=stub_python,
        startup_timeout_s=startup_timeout_s,
    )
    try:
        server.start()
    except ServerError as exc:
        raise PerfError(f"could not start Triton on {repository}: {exc}") from None
    try:
        yield LocalTarget(server, model)
    finally:
        server.stop()


@dataclass
class LoadResult:
    measurements: list[Measurement] = field(default_factory=list)
    raw_csvs: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def sweep(
    analyzer: PerfAnalyzer,
    target: Target,
    texts: list[str],
    workloads: list[Workload],
    out_dir: Path,
    settings: RunSettings,
    prefix: str = "",
    log=print,
    keep_going: bool = False,
) -> LoadResult:
    """Run every workload at every concurrency; perf_analyzer's own CSV for each in out_dir.

    A perf_analyzer failure raises PerfError, unless `keep_going`: then it is logged, kept in
    `errors`, and the next level runs (the caller must report it). A model that stops answering
    always raises.
    """
    input_json = write_input_data(texts, out_dir / "input_data.json")
    target.check(texts)
    result = LoadResult()
    for workload in workloads:
        latency_ms = 1000 * target.request_seconds(texts, workload.sentences)
        for concurrency in workload.concurrency:
            stem = f"{prefix}pa_b{workload.sentences}_c{concurrency}"
            started = time.monotonic()
            # Each window must hold several completed requests: on a CPU one 64-sentence request takes
            # ~0.3 s alone and concurrency x that when queued, and an empty window fails the run.
            window = min(MAX_WINDOW_MS, max(settings.measurement_ms, int(WINDOW_REQUESTS * concurrency * latency_ms)))
            try:
                measurement = run(
                    analyzer,
                    model=target.model,
                    url=target.grpc_url,
                    input_json=input_json,
                    sentences_per_request=workload.sentences,
                    concurrency=concurrency,
                    csv_path=out_dir / f"{stem}.csv",
                    log_path=out_dir / "logs" / f"{stem}.log",
                    settings=replace(settings, measurement_ms=window),
                )
            except PerfError as exc:
                target.still_healthy()
                if not keep_going:
                    raise
                result.errors.append(
                    f"{target.model}, {workload.sentences}-sentence requests, concurrency {concurrency}: {exc}"
                )
                log(f"perf: FAILED {result.errors[-1]}")
                continue
            target.still_healthy()
            result.measurements.append(measurement)
            result.raw_csvs.append(out_dir / f"{stem}.csv")
            log(
                f"{target.model}: {workload.sentences:>3}-sentence requests, concurrency {concurrency:>3}: "
                f"{measurement.sentences_per_s:9.1f} sentences/s, {measurement.requests_per_s:9.1f} requests/s, "
                f"p50 {measurement.p50_us / 1000:8.1f} ms, p99 {measurement.p99_us / 1000:8.1f} ms "
                f"({window} ms windows, {time.monotonic() - started:.0f}s)"
            )
    return result
