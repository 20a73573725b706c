"""Run the real Triton server bundled in the nvidia-pytriton wheel, without Docker.

See shared/triton-local.md for why each step exists: a private copy of the binary with the stub for
this Python, LD_LIBRARY_PATH with the wheel's libraries and this Python's LIBDIR, and a stub
environment (numpy<2, torch, tokenizers) chosen through PATH because the stub ignores PYTHONPATH.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The guard module is imported where it is used, so that `python -m mtl_serve.guard` runs it cleanly.

TRITON_VERSION = "2.51.0"
STUB_NAME = "triton_python_backend_stub"
# Modules the served model.py imports inside the stub.
STUB_MODULES = ("numpy", "torch", "tokenizers", "safetensors")
# Header that unlocks the restricted APIs (RESTRICTED_APIS) over HTTP; without it they are refused.
ADMIN_HEADER = "mtl-admin-key"
# Over gRPC, Triton 2.51 expects the same key under this prefixed metadata name.
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# Triton API categories that need ADMIN_HEADER: loading models, registering shared memory, and changing
# server-wide log and trace settings are operator actions, not a client's.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")

logger = logging.getLogger("mtl_serve.local")


class ServerError(RuntimeError):
    """The local Triton server could not be started, or stopped working."""


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cache_dir() -> Path:
    base = os.environ.get("MTL_TRITON_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "mtl-triton")
    return Path(base)


def wheel_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs) inside site-packages."""
    try:
        import pytriton
    except ImportError:
        raise ServerError("the nvidia-pytriton package (which carries the Triton binary) is not installed: pip install nvidia-pytriton==0.7.0") from None
    package = Path(pytriton.__file__).resolve().parent
    server, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServerError(f"no tritonserver binary under {server}: the nvidia-pytriton install is incomplete")
    return server, libs


def prepare_runtime(target: Path | None = None) -> Path:
    """A private copy of the server with this Python's stub in backends/python; made once, then reused."""
    source, _ = wheel_paths()
    version = _python_version()
    target = target or cache_dir() / f"tritonserver-{TRITON_VERSION}-py{version}"
    if (target / "backends" / "python" / STUB_NAME).is_file():
        return target
    stub = source / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ServerError(f"the Triton wheel has no python-backend stub for Python {version} ({stub})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    for part in ("bin", "backends", "caches"):
        if (source / part).exists():
            shutil.copytree(source / part, staging / part)
    shutil.copy2(stub, staging / "backends" / "python" / STUB_NAME)
    try:
        staging.rename(target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_stub_environment(python: Path) -> str:
    """Prove the stub's Python can import the model's modules with numpy<2; return its numpy version."""
    probe = (
        "import importlib.util, sys\n"
        f"mods = {STUB_MODULES!r}\n"
        "missing = [m for m in mods if importlib.util.find_spec(m) is None]\n"
        "if missing: sys.exit('missing modules: ' + ', '.join(missing))\n"
        "import numpy; print(numpy.__version__)\n"
    )
    try:
        result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"cannot run the stub environment's python {python}: {exc}") from None
    if result.returncode != 0:
        raise ServerError(f"the stub environment ({python}) is not usable: {result.stderr.strip()[-400:]}")
    numpy_version = result.stdout.strip()
    if int(numpy_version.split(".")[0]) >= 2:
        raise ServerError(
            f"the stub environment ({python}) has numpy {numpy_version}; Triton 2.51's python stub needs numpy<2 "
            "(it crashes on the first text request otherwise). Install numpy==1.26.4 there or pass --stub-python."
        )
    return numpy_version


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # Triton binds 0.0.0.0 too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port not handed out before by this process: the OS may offer a just-closed one again."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def model_names(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file() and not p.name.startswith("."))


def log_problems(text: str, limit: int = 12) -> str:
    """The lines of a Triton log worth showing a user: errors and failed loads."""
    keys = ("error", "failed", "unhealthy", "not healthy", "exception", "traceback", "address already in use")
    lines = [line for line in text.splitlines() if line.startswith("E") or any(k in line.lower() for k in keys)]
    return "\n".join(lines[-limit:]) or "\n".join(text.splitlines()[-limit:])


@dataclass
class LocalTriton:
    """The bundled Triton serving a model repository; a context manager that always cleans up.

    Ports of 0 are replaced by free ones. `with LocalTriton(repo) as server: server.grpc_url`.

    Two guards against faults the bundled Triton 2.51 does not survive (docs/reliability.md):
    - `http_guard`: the HTTP and metrics ports are served by a vetting proxy (mtl_serve.guard) in
      this process; Triton's own HTTP and metrics endpoints listen on loopback ports behind it.
    - `watchdog`: Triton 2.51 leaves a model READY when its python-backend stub dies, and fails every
      request after that. A thread watches the stub processes and restarts Triton on the same ports
      when one dies (at most `max_restarts` times in `restart_window_s`; then it stops Triton and
      `failure` says why).
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
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_args: tuple[str, ...] = ()
    # gRPC over TLS (Triton's own SSL): PEM files; a root cert with grpc_ssl_mutual checks client certificates.
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    grpc_ssl_mutual: bool = False
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    http_guard: bool = True
    max_http_body_bytes: int = 64 * 1024 * 1024  # mtl_serve.guard.DEFAULT_MAX_BODY_BYTES
    # glibc's dynamic mmap threshold lets the stub's heap keep every activation buffer it ever freed: under
    # mixed short/long batches its RSS grew by ~650 MiB in 80 s and kept growing. Buffers of 2 MiB and more
    # (the long-row activations) are mmapped at this fixed threshold and go back to the OS when freed.
    # None leaves glibc's default; a MALLOC_MMAP_THRESHOLD_ already in the environment wins.
    malloc_mmap_threshold: int | None = 2 * 1024 * 1024
    watchdog: bool = True
    watchdog_interval_s: float = 0.5
    max_restarts: int = 3
    restart_window_s: float = 300.0
    # Called with each watchdog event (a one-line message); events are also kept in `events`.
    on_event: Callable[[str], None] | None = field(default=None, repr=False)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if bool(self.grpc_server_cert) != bool(self.grpc_server_key):
            raise ServerError("gRPC TLS needs both a server certificate and its private key")
        self.events: list[str] = []
        self.restarts = 0
        self.failure: str | None = None
        self._restart_times: list[float] = []
        self._stubs: dict[int, str] = {}
        self._guards: list = []  # mtl_serve.guard.HttpGuard
        self._triton_http_port = self._triton_metrics_port = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._runtime: Path | None = None
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

    def stub_pids(self) -> list[int]:
        """The python-backend stub processes of the running Triton."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [pid for pid in group_members(self.process.pid) if STUB_NAME in _cmdline(pid)]

    # -- life cycle ----------------------------------------------------------------------------------
    def command(self, runtime: Path) -> list[str]:
        restricted = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
        # Behind the guard, Triton's HTTP and metrics listen on loopback ports only the guard uses.
        http_host, http_port = ("127.0.0.1", self._triton_http_port) if self.http_guard else (self.host, self.http_port)
        metrics_host, metrics_port = (("127.0.0.1", self._triton_metrics_port) if self.http_guard
                                      else (self.host, self.metrics_port))
        tls = []
        if self.tls:
            tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.grpc_server_cert).resolve()}",
                   f"--grpc-server-key={Path(self.grpc_server_key).resolve()}"]
            if self.grpc_root_cert:
                tls.append(f"--grpc-root-cert={Path(self.grpc_root_cert).resolve()}")
            if self.grpc_ssl_mutual:
                tls.append("--grpc-use-ssl-mutual=true")
        return [
            str(runtime / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={runtime / 'backends'}",
            f"--cache-directory={runtime / 'caches'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={http_host}",
            f"--http-port={http_port}",
            f"--metrics-address={metrics_host}",
            f"--metrics-port={metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            *tls,
            *self.extra_args,
        ]

    def environment(self, stub_python: Path) -> dict[str, str]:
        _, libs = wheel_paths()
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub takes sys.prefix and site-packages from the first python3 on PATH.
        env["PATH"] = os.pathsep.join((str(stub_python.parent), env.get("PATH", "")))
        env.pop("PYTHONPATH", None)
        if self.malloc_mmap_threshold is not None:
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(self.malloc_mmap_threshold))
        return env

    def start(self) -> "LocalTriton":
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run mtl-build first")
        names = model_names(self.model_repository)
        if not names:
            raise ServerError(f"model repository {self.model_repository} holds no model (no */config.pbtxt): run mtl-build first")
        for label, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if not port_is_free(port):
                raise ServerError(f"{label} port {port} is already in use (choose another with --{label.lower()}-port)")
        for label, path in (("server certificate", self.grpc_server_cert), ("server key", self.grpc_server_key),
                            ("root certificate", self.grpc_root_cert)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"gRPC TLS {label} {path} does not exist")
        self._stub_python = Path(self.stub_python or Path(sys.prefix) / "bin" / "python3")
        check_stub_environment(self._stub_python)
        self._runtime = prepare_runtime()
        if self.log_file is None:
            logs = cache_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_file = logs / f"tritonserver-{self.http_port}.log"
        self.log_file = Path(self.log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self.failure = None
        try:
            if self.http_guard:
                self._start_guards()
            self._launch(names, append=False)
        except BaseException:
            self.stop()
            raise
        if self.watchdog:
            self._watch_thread = threading.Thread(target=self._watch, args=(names,), name="mtl-serve-watchdog",
                                                  daemon=True)
            self._watch_thread.start()
        return self

    def _start_guards(self) -> None:
        from .guard import HttpGuard

        for attr in ("_triton_http_port", "_triton_metrics_port"):
            if not getattr(self, attr) or not port_is_free(getattr(self, attr)):
                setattr(self, attr, free_port())
        for name, port, upstream, limit in (("http", self.http_port, self._triton_http_port, self.max_http_body_bytes),
                                            ("metrics", self.metrics_port, self._triton_metrics_port, 1 << 20)):
            try:
                guard = HttpGuard(self.host, port, "127.0.0.1", upstream, max_body_bytes=limit, name=name)
            except OSError as exc:
                raise ServerError(f"{name} port {port} is already in use ({exc.strerror})") from None
            self._guards.append(guard.start())

    def _launch(self, names: list[str], append: bool) -> None:
        with self.log_file.open("ab" if append else "wb") as log:
            # Its own session, so that a stop reaches the stub processes too.
            self.process = subprocess.Popen(
                self.command(self._runtime), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(self._stub_python), start_new_session=True,
            )
        self.wait_until_ready(names)
        self._stubs = {pid: _start_time(pid) for pid in self.stub_pids()}

    def _get(self, path: str, direct: bool = False) -> int:
        base = f"http://127.0.0.1:{self._triton_http_port}" if direct and self.http_guard else self.http_url
        try:
            with urllib.request.urlopen(f"{base}{path}", timeout=2) as response:
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
            f"models {names} not ready after {self.startup_timeout_s:.0f}s (log: {self.log_file}):\n" + log_problems(self.log_text())
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

    def _watch(self, names: list[str]) -> None:
        while not self._stopping.wait(self.watchdog_interval_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                if self.process.poll() is not None:
                    self._end_process(grace_s=0)  # its stubs, if it left any
                    self._fail(f"tritonserver exited with code {self.process.returncode} (log: {self.log_file}):\n"
                               + log_problems(self.log_text()))
                    return
                dead = [pid for pid, started in self._stubs.items() if _start_time(pid) != started]
                if not dead:
                    continue
                self._event(f"python-backend stub process {', '.join(map(str, dead))} died: Triton keeps the model "
                            "READY but fails every request")
                now = time.monotonic()
                self._restart_times = [t for t in self._restart_times if now - t < self.restart_window_s]
                if len(self._restart_times) >= self.max_restarts:
                    self._end_process(grace_s=2)
                    self._fail(f"the python-backend stub died, and {len(self._restart_times)} of "
                               f"{self.max_restarts} allowed restart(s) within {self.restart_window_s:.0f}s "
                               f"were already used: stopped Triton (log: {self.log_file})")
                    return
                self._restart_times.append(now)
                self.restarts += 1
                self._event(f"restarting Triton on the same ports (restart {self.restarts})")
                try:
                    self._end_process(grace_s=2)
                    with self.log_file.open("ab") as log:
                        log.write(f"\n==== mtl-serve watchdog: stub {dead} died, restarting Triton ====\n".encode())
                    self._launch(names, append=True)
                except ServerError as exc:
                    if self._stopping.is_set():
                        return
                    self._end_process(grace_s=0)
                    self._fail(f"restart failed: {exc}")
                    return
                self._event(f"Triton restarted: models {', '.join(names)} ready")

    def _end_process(self, grace_s: float) -> int | None:
        """SIGTERM Triton's process group, wait `grace_s`, then SIGKILL what is left."""
        if self.process is None:
            return None
        group = self.process.pid
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Stubs left behind by a crashed server still belong to its process group.
        _signal_group(group, signal.SIGKILL)
        _wait_group_gone(group, timeout_s=10)
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM the server's process group, wait for in-flight work, then SIGKILL what is left."""
        self._stopping.set()
        watcher = self._watch_thread
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.startup_timeout_s + 30)
        self._watch_thread = None
        with self._lock:
            code = self._end_process(grace_s=self.exit_timeout_s + 15)
            for guard in self._guards:
                guard.stop()
            self._guards = []
        return code

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), or "" when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 5 (after the parenthesised command name) is the process group id.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _wait_group_gone(group: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
