"""Run the real Triton server bundled in the nvidia-pytriton wheel, without Docker: LocalTriton's life cycle
and its watchdog.

The runtime it runs (the private copy of the binary, its environment, the stub check) comes from
mtl_serve.runtime, and what it reads of processes from mtl_serve.procs; docs/triton-local.md says why
each runtime step exists, docs/reliability.md what the guards and the watchdog are for.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .health import STUB_FAILURE, Probe, UpstreamHealth, canary_request
from .procs import (
    cmdline,
    cpu_ticks,
    free_port,
    group_members,
    is_stopped,
    port_is_free,
    remove_shm_regions,
    shm_regions,
    signal_group,
    start_time,
    wait_group_gone,
)
from .runtime import (
    HIDDEN_ARG_PREFIX,
    PRELOAD_REST,
    RUNTIME_MODULES,
    STUB_MODULES,
    STUB_NAME,
    TRITON_VERSION,
    ServerError,
    cache_dir,
    check_stub_environment,
    hidden_args_library,
    prepare_runtime,
    runtime_environment,
    wheel_paths,
)

# The guard modules are imported where they are used, so that `python -m mtl_serve.guard` runs it cleanly.

# Header that unlocks the restricted APIs (RESTRICTED_APIS) over HTTP; without it they are refused.
ADMIN_HEADER = "mtl-admin-key"
# Over gRPC, Triton 2.51 expects the same key under this prefixed metadata name.
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# Triton API categories that need ADMIN_HEADER: loading models, registering shared memory, and changing
# server-wide log and trace settings are operator actions, not a client's.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
# Options whose values hold keys: passed through the environment, never on the command line.
SECRET_OPTIONS = ("--grpc-restricted-protocol=", "--http-restricted-api=")
# A canary past its deadline means a hang only if the stubs used less CPU than this meanwhile (clock
# ticks, 10 ms each): a stub busy with a long batch is working, not hung.
BUSY_CPU_TICKS = 5

logger = logging.getLogger("mtl_serve.local")

__all__ = [
    "ADMIN_HEADER",
    "GRPC_ADMIN_HEADER",
    "RESTRICTED_APIS",
    "STUB_MODULES",
    "STUB_NAME",
    "TRITON_VERSION",
    "LocalTriton",
    "Recovery",
    "ServerError",
    "cache_dir",
    "check_stub_environment",
    "free_port",
    "group_members",
    "log_problems",
    "model_names",
    "port_is_free",
    "prepare_runtime",
    "request_limit",
    "wheel_paths",
]


def model_names(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file() and not p.name.startswith("."))


def model_configs(repository: Path) -> dict[str, dict]:
    """Each model's config.pbtxt, read through Triton's schema into the dict Triton gives model.py; a model whose
    file cannot be read is left out (Triton reports it when it loads)."""
    from mtl_build.pbtxt import ModelConfigError, read_config

    configs = {}
    for name in model_names(repository):
        try:
            configs[name] = read_config(repository / name)
        except (OSError, ModelConfigError):
            continue
    return configs


def _parameter(config: dict, key: str) -> str | None:
    return (config.get("parameters", {}).get(key) or {}).get("string_value")


def request_limit(repository: Path, default: int) -> int:
    """The most bytes a gRPC request to these models needs: each model's `max_request_bytes` parameter (the
    text it accepts in one request, refused past that by the model itself) plus every row's 4-byte length
    prefix and 64 KiB of framing; `default` when a model does not say."""
    limits = []
    for config in model_configs(repository).values():
        try:
            text_bytes = int(_parameter(config, "max_request_bytes"))
        except (TypeError, ValueError):
            return default
        limits.append(text_bytes + 4 * max(int(config.get("max_batch_size") or 1), 1) + 64 * 1024)
    return max(limits, default=default)


def runtime_modules(repository: Path) -> tuple[str, ...]:
    """The runtime packages the stub must import for these models: what `serving.runtime` names, and for
    `auto` on a CPU the OpenVINO runtime when the build exported its int8 graph (multitask_core.runtimes)."""
    from multitask_core.files import OPENVINO_FILE

    needed = set()
    for name, config in model_configs(repository).items():
        runtime = _parameter(config, "runtime") or "auto"
        if (
            runtime == "auto"
            and _parameter(config, "device") != "gpu"
            and (repository / name / "1" / OPENVINO_FILE).is_file()
        ):
            runtime = "openvino"
        needed.update(RUNTIME_MODULES.get(runtime, ()))
    return tuple(sorted(needed))


def log_problems(text: str, limit: int = 12) -> str:
    """The lines of a Triton log worth showing a user: errors and failed loads."""
    keys = ("error", "failed", "unhealthy", "not healthy", "exception", "traceback", "address already in use")
    lines = [line for line in text.splitlines() if line.startswith("E") or any(k in line.lower() for k in keys)]
    return "\n".join(lines[-limit:]) or "\n".join(text.splitlines()[-limit:])


@dataclass
class Recovery:
    """One fault the watchdog acted on: when it saw it, and when Triton served again (time.monotonic())."""

    cause: str
    detected_at: float
    ready_at: float | None = None


@dataclass
class _Fault:
    cause: str  # a short phrase for the give-up message
    detail: str  # the event line, then any log lines worth showing


class _Health(UpstreamHealth):
    def __init__(self, server: LocalTriton):
        self.server = server

    def ready(self) -> bool:
        return self.server._serving.is_set()

    def generation(self) -> int:
        return self.server._generation

    def stub_failed(self, generation: int, message: str) -> bool:
        return self.server._stub_failed(generation, message)


@dataclass
class LocalTriton:
    """The bundled Triton serving a model repository; a context manager that always cleans up.

    Ports of 0 are replaced by free ones. `with LocalTriton(repo) as server: server.grpc_url`.

    Guards against faults the bundled Triton 2.51 does not survive (docs/reliability.md):
    - `http_guard`: the HTTP and metrics ports are served by a vetting proxy (mtl_serve.guard) in this
      process; Triton's own HTTP and metrics endpoints listen on loopback ports behind it.
    - `grpc_guard`: the gRPC port is served by a proxy (mtl_serve.grpc_guard) that refuses requests over
      `max_grpc_request_bytes` and terminates TLS; Triton's gRPC listens on a loopback port behind it.
    - `watchdog`: Triton 2.51 leaves a model READY when a python-backend stub dies or hangs, and fails
      its requests after that. A thread watches the stubs (alive, not stopped), sends each model a canary
      inference every `probe_interval_s` with a deadline, and hears from the guards when Triton answers
      "Stub process ... is not healthy". On any of these, or when tritonserver exits, the guards answer
      not-ready at once and it restarts Triton on the same ports (at most `max_restarts` times in
      `restart_window_s`; then it stops Triton and `failure` says why).
    - the admin key (and any key in `extra_args`) reaches Triton through its environment, not its
      command line, which every local user can read (runtime.hidden_args_library).
    """

    model_repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None
    stub_python: Path | None = None
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 10
    host: str = "127.0.0.1"
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    extra_args: tuple[str, ...] = field(default=(), repr=False)
    # gRPC over TLS: PEM files; a root cert with grpc_ssl_mutual checks client certificates.
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    grpc_ssl_mutual: bool = False
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    http_guard: bool = True
    max_http_body_bytes: int = 64 * 1024 * 1024  # mtl_serve.guard.DEFAULT_MAX_BODY_BYTES
    grpc_guard: bool = True
    # None: the largest request a model of the repository accepts (request_limit), else 32 MiB.
    max_grpc_request_bytes: int | None = None
    # glibc's dynamic mmap threshold lets the stub's heap keep every activation buffer it ever freed: under
    # mixed short/long batches its RSS grew by ~650 MiB in 80 s and kept growing. Buffers of 2 MiB and more
    # (the long-row activations) are mmapped at this fixed threshold and go back to the OS when freed.
    # None leaves glibc's default; a MALLOC_MMAP_THRESHOLD_ already in the environment wins.
    malloc_mmap_threshold: int | None = 2 * 1024 * 1024
    watchdog: bool = True
    watchdog_interval_s: float = 0.5
    probe_interval_s: float = 2.0
    # Longer than any single execution may take on a CPU (256 rows of 256 tokens); see BUSY_CPU_TICKS.
    probe_deadline_s: float = 10.0
    max_restarts: int = 3
    restart_window_s: float = 300.0
    # Called with each watchdog event (a one-line message); events are also kept in `events`.
    on_event: Callable[[str], None] | None = field(default=None, repr=False)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    # The models check_setup() found, so that start() right after it does not probe the stub environment again.
    _checked_names: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if bool(self.grpc_server_cert) != bool(self.grpc_server_key):
            raise ServerError("gRPC TLS needs both a server certificate and its private key")
        self.events: list[str] = []
        self.recoveries: list[Recovery] = []
        self.restarts = 0
        self.canaries_sent = 0
        self.canaries_late = 0  # unanswered within the deadline while the stubs were busy (not a fault)
        self.failure: str | None = None
        self._restart_times: list[float] = []
        self._stubs: dict[int, str] = {}
        self._stopped_seen: set[int] = set()
        self._shm: set[str] = set()
        self._probes: dict[str, Probe] = {}
        self._probe_pool: ThreadPoolExecutor | None = None
        self._reported: str | None = None
        self._generation = 0
        self._guards: list = []  # mtl_serve.guard.HttpGuard, mtl_serve.grpc_guard.GrpcGuard
        self._health = _Health(self)
        self._triton_http_port = self._triton_metrics_port = self._triton_grpc_port = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._serving = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._runtime: Path | None = None
        self._hidden_args: Path | None = None
        self._stub_python: Path | None = None

    # -- endpoints -----------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def tls(self) -> bool:
        return self.grpc_server_cert is not None

    @property
    def secrets_hidden(self) -> bool:
        """Whether keys reach Triton outside its command line (needs a C compiler once: runtime.py)."""
        return self._hidden_args is not None

    @property
    def shm_regions(self) -> set[str]:
        """The /dev/shm regions of the running Triton's stubs; removed when it stops or is restarted."""
        return set(self._shm)

    def stub_pids(self) -> list[int]:
        """The python-backend stub processes of the running Triton."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [pid for pid in group_members(self.process.pid) if STUB_NAME in cmdline(pid)]

    # -- life cycle ----------------------------------------------------------------------------------
    def command(self, runtime: Path) -> list[str]:
        """tritonserver's full command line, keys included (they are moved out of it at launch)."""
        restricted = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
        # Behind a guard, Triton listens on a loopback port only the guard (and the watchdog) uses.
        http_host, http_port = ("127.0.0.1", self._triton_http_port) if self.http_guard else (self.host, self.http_port)
        metrics_host, metrics_port = (
            ("127.0.0.1", self._triton_metrics_port) if self.http_guard else (self.host, self.metrics_port)
        )
        grpc_host, grpc_port = ("127.0.0.1", self._triton_grpc_port) if self.grpc_guard else (self.host, self.grpc_port)
        tls = []
        if self.tls and not self.grpc_guard:
            tls = [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={Path(self.grpc_server_cert).resolve()}",
                f"--grpc-server-key={Path(self.grpc_server_key).resolve()}",
            ]
            if self.grpc_root_cert:
                tls.append(f"--grpc-root-cert={Path(self.grpc_root_cert).resolve()}")
            if self.grpc_ssl_mutual:
                tls.append("--grpc-use-ssl-mutual=true")
        return [
            str(runtime / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={runtime / 'backends'}",
            f"--cache-directory={runtime / 'caches'}",
            f"--grpc-address={grpc_host}",
            f"--grpc-port={grpc_port}",
            f"--http-address={http_host}",
            f"--http-port={http_port}",
            f"--metrics-address={metrics_host}",
            f"--metrics-port={metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            # p50/p99 latency summaries for the dashboard (docs/metrics.md); counters alone give no quantiles.
            "--metrics-config=summary_latencies=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            *tls,
            *self.extra_args,
        ]

    def environment(self, stub_python: Path) -> dict[str, str]:
        env = runtime_environment(stub_python)
        if self.malloc_mmap_threshold is not None:
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(self.malloc_mmap_threshold))
        return env

    def _launch_command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment to start Triton with: keys in the environment when possible."""
        argv, env = self.command(self._runtime), self.environment(self._stub_python)
        if self._hidden_args is None:
            return argv, env
        for index, arg in enumerate(argv):
            if index and arg.startswith(SECRET_OPTIONS):
                env[f"{HIDDEN_ARG_PREFIX}{index}"] = arg
                argv[index] = f"{arg.split('=', 1)[0]}=(hidden)"
        preloaded = env.get("LD_PRELOAD", "")
        env[PRELOAD_REST] = preloaded
        env["LD_PRELOAD"] = f"{self._hidden_args}:{preloaded}" if preloaded else str(self._hidden_args)
        return argv, env

    def check_setup(self) -> list[str]:
        """Everything that can be refused before Triton starts (repository, ports, TLS files, the stub's
        environment); raises ServerError. Returns the models' names."""
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run mtl-build first")
        names = model_names(self.model_repository)
        if not names:
            raise ServerError(
                f"model repository {self.model_repository} holds no model (no */config.pbtxt): run mtl-build first"
            )
        for label, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if not port_is_free(port):
                raise ServerError(f"{label} port {port} is already in use (choose another with --{label.lower()}-port)")
        for label, path in (
            ("server certificate", self.grpc_server_cert),
            ("server key", self.grpc_server_key),
            ("root certificate", self.grpc_root_cert),
        ):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"gRPC TLS {label} {path} does not exist")
        if self.max_grpc_request_bytes is None:
            from .grpc_guard import DEFAULT_MAX_REQUEST_BYTES

            self.max_grpc_request_bytes = request_limit(self.model_repository, DEFAULT_MAX_REQUEST_BYTES)
        self._stub_python = Path(self.stub_python or Path(sys.prefix) / "bin" / "python3")
        check_stub_environment(self._stub_python, runtime_modules(self.model_repository))
        self._checked_names = names
        return names

    def start(self) -> LocalTriton:
        names = self._checked_names or self.check_setup()
        self._checked_names = None
        self._runtime = prepare_runtime()
        self._hidden_args = hidden_args_library(self._runtime)
        if self.log_file is None:
            logs = cache_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_file = logs / f"tritonserver-{self.http_port}.log"
        self.log_file = Path(self.log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self.failure = None
        try:
            self._start_guards()
            self._launch(names, append=False)
        except BaseException:
            self.stop()
            raise
        if self.watchdog:
            # Two per model: a canary left over from before a restart does not hold up the next one.
            self._probe_pool = ThreadPoolExecutor(max_workers=2 * len(names), thread_name_prefix="mtl-serve-canary")
            self._watch_thread = threading.Thread(
                target=self._watch, args=(names,), name="mtl-serve-watchdog", daemon=True
            )
            self._watch_thread.start()
        return self

    def _start_guards(self) -> None:
        from .grpc_guard import GrpcGuard
        from .guard import HttpGuard

        private = [
            attr
            for attr, on in (
                ("_triton_http_port", self.http_guard),
                ("_triton_metrics_port", self.http_guard),
                ("_triton_grpc_port", self.grpc_guard),
            )
            if on
        ]
        for attr in private:
            if not getattr(self, attr) or not port_is_free(getattr(self, attr)):
                setattr(self, attr, free_port())
        if self.http_guard:
            for name, port, upstream, limit in (
                ("http", self.http_port, self._triton_http_port, self.max_http_body_bytes),
                ("metrics", self.metrics_port, self._triton_metrics_port, 1 << 20),
            ):
                try:
                    guard = HttpGuard(
                        self.host,
                        port,
                        "127.0.0.1",
                        upstream,
                        max_body_bytes=limit,
                        name=name,
                        health=self._health if name == "http" else None,
                    )
                except OSError as exc:
                    raise ServerError(f"{name} port {port} is already in use ({exc.strerror})") from None
                self._guards.append(guard.start())
        if self.grpc_guard:
            guard = GrpcGuard(
                self.host,
                self.grpc_port,
                "127.0.0.1",
                self._triton_grpc_port,
                max_request_bytes=self.max_grpc_request_bytes,
                credentials=self._grpc_credentials(),
                health=self._health,
            )
            try:
                self._guards.append(guard.start())
            except OSError as exc:
                raise ServerError(f"gRPC port {self.grpc_port} is already in use ({exc})") from None

    def _grpc_credentials(self):
        if not self.tls:
            return None
        import grpc

        root = Path(self.grpc_root_cert).read_bytes() if self.grpc_root_cert else None
        return grpc.ssl_server_credentials(
            [(Path(self.grpc_server_key).read_bytes(), Path(self.grpc_server_cert).read_bytes())],
            root_certificates=root,
            require_client_auth=self.grpc_ssl_mutual,
        )

    def _launch(self, names: list[str], append: bool) -> None:
        argv, env = self._launch_command()
        self._generation += 1
        with self.log_file.open("ab" if append else "wb") as log:
            # Its own session, so that a stop reaches the stub processes too.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.wait_until_ready(names)
        self._stubs = {pid: start_time(pid) for pid in self.stub_pids()}
        self._stopped_seen = set()
        self._reported = None
        self._shm = shm_regions([self.process.pid, *self._stubs])
        if self.watchdog:
            self._probes = {name: probe for name in names if (probe := self._make_probe(name))}
        self._serving.set()

    def _direct_url(self, path: str) -> str:
        """Triton's own HTTP endpoint, past the guard."""
        host, port = ("127.0.0.1", self._triton_http_port) if self.http_guard else (self.host, self.http_port)
        return f"http://{host}:{port}{path}"

    def _make_probe(self, name: str) -> Probe | None:
        try:
            with urllib.request.urlopen(self._direct_url(f"/v2/models/{name}/config"), timeout=10) as response:
                return Probe(name, self._direct_url(f"/v2/models/{name}/infer"), canary_request(json.load(response)))
        except (OSError, ValueError, KeyError) as exc:
            self._event(f"cannot read model {name}'s config for the watchdog's canary ({exc}): not probing it")
            return None

    def _get(self, path: str, direct: bool = False) -> int:
        url = self._direct_url(path) if direct else f"{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def is_ready(self, model: str | None = None) -> bool:
        return self._get(f"/v2/models/{model}/ready" if model else "/v2/health/ready") == 200

    def wait_until_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                raise ServerError("stopped while waiting for Triton to become ready")
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} during start-up (log: {self.log_file}):\n"
                    + log_problems(self.log_text())
                )
            if self._get("/v2/health/ready", direct=True) == 200 and all(
                self._get(f"/v2/models/{name}/ready", direct=True) == 200 for name in names
            ):
                return
            time.sleep(0.25)
        raise ServerError(
            f"models {names} not ready after {self.startup_timeout_s:.0f}s (log: {self.log_file}):\n"
            + log_problems(self.log_text())
        )

    # -- watchdog ------------------------------------------------------------------------------------
    def _event(self, message: str) -> None:
        self.events.append(message)
        logger.info("%s", message)
        if self.on_event is not None:
            self.on_event(message)

    def _fail(self, reason: str) -> None:
        # Set last, so that whoever sees `failure` also sees Triton already stopped.
        self._event(reason.splitlines()[0])
        self.failure = reason

    def _stub_failed(self, generation: int, message: str) -> bool:
        """A guard saw Triton answer with a stub failure: not ready from now, and wake the watchdog."""
        if not self.watchdog or generation != self._generation or self._stopping.is_set():
            return False
        self._serving.clear()
        self._reported = message
        self._wake.set()
        return True

    def _watch(self, names: list[str]) -> None:
        while True:
            self._wake.wait(self.watchdog_interval_s)
            self._wake.clear()
            with self._lock:
                if self._stopping.is_set():
                    return
                fault = self._find_fault()
                if fault is not None and not self._recover(names, fault):
                    return

    def _find_fault(self) -> _Fault | None:
        code = self.process.poll()
        if code is not None:
            return _Fault(
                f"tritonserver exited with code {code}",
                f"tritonserver exited with code {code} (log: {self.log_file}):\n" + log_problems(self.log_text()),
            )
        dead = [pid for pid, started in self._stubs.items() if start_time(pid) != started]
        if dead:
            return _Fault(
                "the python-backend stub died",
                f"python-backend stub process {', '.join(map(str, dead))} "
                "died: Triton keeps the model READY but fails every request",
            )
        if self._reported is not None:
            return _Fault(
                "a python-backend stub failed",
                f"Triton answered a request with {self._reported!r}: it keeps the model READY but fails "
                "that instance's requests from now on",
            )
        stopped = {pid for pid in self._stubs if is_stopped(pid)}
        hung, self._stopped_seen = stopped & self._stopped_seen, stopped
        if hung:
            return _Fault(
                "a python-backend stub stopped answering",
                f"python-backend stub process {', '.join(map(str, sorted(hung)))} is stopped (a signal or a "
                f"tracer) on two looks {self.watchdog_interval_s}s apart: Triton fails its requests and "
                "never recovers it",
            )
        return self._check_probes()

    def _check_probes(self) -> _Fault | None:
        now = time.monotonic()
        for probe in self._probes.values():
            if probe.future is None:
                if now - probe.sent_at >= self.probe_interval_s:
                    probe.send(self._probe_pool, now, self._stub_cpu_ticks(), self.probe_deadline_s)
                    self.canaries_sent += 1
                continue
            answer = probe.result()
            if answer is None:
                continue
            status, text = answer
            if status == 200:
                probe.answered = True
            elif STUB_FAILURE.search(text):
                return _Fault(
                    "a python-backend stub failed",
                    f"the watchdog's canary inference of model {probe.model} "
                    f"got {text!r}: Triton keeps the model READY but fails that instance's requests",
                )
            elif status is None and self._stub_cpu_ticks() - probe.cpu_at_send < BUSY_CPU_TICKS:
                return _Fault(
                    "a python-backend stub stopped answering",
                    f"the watchdog's canary inference of model {probe.model} got no answer in "
                    f"{self.probe_deadline_s:.0f}s while its stubs used no CPU: Triton is hung",
                )
            elif status is None:
                self.canaries_late += 1  # the stubs were computing: busy, not hung
            elif not probe.answered:
                self._event(
                    f"model {probe.model} refused the watchdog's canary inference ({status}: {text[:200]}): "
                    "not probing it"
                )
                probe.sent_at = math.inf
        return None

    def _stub_cpu_ticks(self) -> int:
        return sum(cpu_ticks(pid) for pid in self._stubs)

    def _recover(self, names: list[str], fault: _Fault) -> bool:
        """Restart Triton after `fault`; False when the restart budget is spent or the restart failed."""
        self._serving.clear()
        recovery = Recovery(fault.cause, time.monotonic())
        self.recoveries.append(recovery)
        first, _, rest = fault.detail.partition("\n")
        self._event(first)
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < self.restart_window_s]
        if len(self._restart_times) >= self.max_restarts:
            self._end_process(grace_s=2)
            self._fail(
                f"{fault.cause}, and {len(self._restart_times)} of {self.max_restarts} allowed restart(s) "
                f"within {self.restart_window_s:.0f}s were already used: stopped Triton (log: {self.log_file})"
                + (f"\n{rest}" if rest else "")
            )
            return False
        self._restart_times.append(now)
        self.restarts += 1
        self._event(f"restarting Triton on the same ports (restart {self.restarts})")
        try:
            self._end_process(grace_s=2)
            with self.log_file.open("ab") as log:
                log.write(f"\n==== mtl-serve watchdog: {first}; restarting Triton ====\n".encode())
            self._launch(names, append=True)
        except ServerError as exc:
            if self._stopping.is_set():
                return False
            self._end_process(grace_s=0)
            self._fail(f"restart failed: {exc}")
            return False
        recovery.ready_at = time.monotonic()
        self._event(
            f"Triton restarted {recovery.ready_at - recovery.detected_at:.1f}s after the fault was seen: "
            f"models {', '.join(names)} ready"
        )
        return True

    def _end_process(self, grace_s: float) -> int | None:
        """SIGTERM Triton's process group, wait `grace_s`, SIGKILL what is left, and remove its shared memory."""
        self._serving.clear()
        if self.process is None:
            return None
        group = self.process.pid
        regions = self._shm | shm_regions(group_members(group))
        if self.process.poll() is None:
            signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                signal_group(group, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Stubs left behind by a crashed server still belong to its process group.
        signal_group(group, signal.SIGKILL)
        wait_group_gone(group, timeout_s=10)
        # Triton unlinks the regions of the stubs it stopped; a dead or killed stub's region stays behind.
        remove_shm_regions(regions)
        self._shm = set()
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM the server's process group, wait for in-flight work, then SIGKILL what is left."""
        self._stopping.set()
        self._wake.set()
        watcher = self._watch_thread
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.startup_timeout_s + 30)
        self._watch_thread = None
        with self._lock:
            code = self._end_process(grace_s=self.exit_timeout_s + 15)
            for guard in self._guards:
                guard.stop()
            self._guards = []
            if self._probe_pool is not None:
                self._probe_pool.shutdown(wait=False, cancel_futures=True)
                self._probe_pool = None
        return code

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
