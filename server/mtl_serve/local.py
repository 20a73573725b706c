"""Run the real Triton server bundled in the nvidia-pytriton wheel, without Docker.

See shared/triton-local.md for why each step exists: a private copy of the binary with the stub for
this Python, LD_LIBRARY_PATH with the wheel's libraries and this Python's LIBDIR, and a stub
environment (numpy<2, torch, tokenizers) chosen through PATH because the stub ignores PYTHONPATH.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TRITON_VERSION = "2.51.0"
STUB_NAME = "triton_python_backend_stub"
# Modules the served model.py imports inside the stub.
STUB_MODULES = ("numpy", "torch", "tokenizers", "safetensors")
# Header that unlocks Triton's model-control and shared-memory APIs; without it they are refused.
ADMIN_HEADER = "mtl-admin-key"


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
        "import importlib, sys\n"
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

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

    # -- life cycle ----------------------------------------------------------------------------------
    def command(self, runtime: Path) -> list[str]:
        restricted = f"model-repository,shared-memory:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(runtime / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={runtime / 'backends'}",
            f"--cache-directory={runtime / 'caches'}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
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
        stub_python = Path(self.stub_python or Path(sys.prefix) / "bin" / "python3")
        check_stub_environment(stub_python)
        runtime = prepare_runtime()
        if self.log_file is None:
            logs = cache_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_file = logs / f"tritonserver-{self.http_port}.log"
        self.log_file = Path(self.log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            # Its own session, so that a stop reaches the stub processes too.
            self.process = subprocess.Popen(
                self.command(runtime), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(stub_python), start_new_session=True,
            )
        try:
            self.wait_until_ready(names)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.http_url}{path}", timeout=2) as response:
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
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} during start-up (log: {self.log_file}):\n"
                    + log_problems(self.log_text())
                )
            if self.is_ready() and all(self.is_ready(name) for name in names):
                return
            time.sleep(0.25)
        raise ServerError(
            f"models {names} not ready after {self.startup_timeout_s:.0f}s (log: {self.log_file}):\n" + log_problems(self.log_text())
        )

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM the server's process group, wait for in-flight work, then SIGKILL what is left."""
        if self.process is None:
            return None
        group = self.process.pid
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Stubs left behind by a crashed server still belong to its process group.
        _signal_group(group, signal.SIGKILL)
        _wait_group_gone(group, timeout_s=10)
        return self.process.returncode

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


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
