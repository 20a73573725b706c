"""Find or install perf_analyzer, run it, and turn its output into checked results.

perf_analyzer comes from the tritonclient 2.50.0 wheel: newer wheels (2.52+) and the perf-analyzer 2.60
package need glibc 2.38, which Debian 12 lacks (docs/triton-local.md). The binary is extracted into
the mtl-triton cache once; it needs libb64.so.0d and libcudart.so.12, which the nvidia-pytriton wheel
already carries under other names, so a folder of two symlinks goes on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

PERF_ANALYZER_VERSION = "2.50.0"
WHEEL_MEMBER = f"tritonclient-{PERF_ANALYZER_VERSION}.data/data/bin/perf_analyzer"
# Lines perf_analyzer prints when a request or a measurement failed; any of them fails the run.
ERROR_PATTERNS = (
    re.compile(r"Thread \[\d+\] had error"),
    re.compile(r"^\s*error:", re.IGNORECASE | re.MULTILINE),
    re.compile(r"Failed to (?:retrieve|obtain|get|init|create|parse|load)", re.IGNORECASE),
    re.compile(r"Server side statistics compute counts must be the same"),
)


class PerfError(RuntimeError):
    """perf_analyzer could not be set up, failed, or produced no usable measurement."""


def cache_root() -> Path:
    from ..triton import cache_dir

    return cache_dir()


def _library_folder(root: Path) -> Path:
    """Symlinks named as perf_analyzer expects them, to the libraries inside the nvidia-pytriton wheel."""
    from ..triton import wheel_paths

    _, libs = wheel_paths()
    folder = root / "lib"
    wanted = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
    for name, pattern in wanted.items():
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise PerfError(f"{libs} has no {pattern}: the nvidia-pytriton install is incomplete")
        link = folder / name
        if link.is_symlink() and link.resolve() == matches[0].resolve():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(matches[0])
        tmp.replace(link)
    return folder


def _download_wheel(folder: Path) -> Path:
    from ..wheels import WheelDownloadError, download_wheel

    try:
        return download_wheel(f"tritonclient=={PERF_ANALYZER_VERSION}", folder, timeout_s=600)
    except WheelDownloadError as exc:
        raise PerfError(
            f"could not download tritonclient=={PERF_ANALYZER_VERSION} for its perf_analyzer: {exc}"
        ) from None


def install(wheel: Path | None = None, root: Path | None = None) -> Path:
    """Extract perf_analyzer into <cache>/perf_analyzer-2.50.0/ (downloading the wheel if none is given)."""
    root = root or cache_root() / f"perf_analyzer-{PERF_ANALYZER_VERSION}"
    binary = root / "perf_analyzer"
    if not binary.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".pa-") as tmp:
            wheel = wheel or _download_wheel(Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source:
                    staged = Path(tmp) / "perf_analyzer"
                    with open(staged, "wb") as target:
                        shutil.copyfileobj(source, target)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise PerfError(f"{wheel} holds no {WHEEL_MEMBER}: {exc}") from None
            staged.chmod(0o755)
            root.mkdir(exist_ok=True)
            staged.replace(binary)
    _library_folder(root)
    return binary


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path | None = None

    @classmethod
    def locate(cls, explicit: Path | None = None, install_missing: bool = True) -> PerfAnalyzer:
        """--perf-analyzer, else $MTL_PERF_ANALYZER, else the cached 2.50 binary (installed when missing)."""
        chosen = explicit or (Path(os.environ["MTL_PERF_ANALYZER"]) if os.environ.get("MTL_PERF_ANALYZER") else None)
        root = cache_root() / f"perf_analyzer-{PERF_ANALYZER_VERSION}"
        if chosen is None:
            if not (root / "perf_analyzer").is_file() and not install_missing:
                raise PerfError(f"perf_analyzer is not installed under {root}: run `python -m mtl_tools.perf install`")
            chosen = install(root=root)
        if not os.access(chosen, os.X_OK):
            raise PerfError(f"{chosen} is not an executable perf_analyzer")
        # A binary beside a lib/ folder (the cache layout) gets it; otherwise the wheel's libraries.
        lib_dir = chosen.parent / "lib" if (chosen.parent / "lib").is_dir() else None
        if lib_dir is None:
            try:
                lib_dir = _library_folder(root)
            except Exception:  # a system install (e.g. perf-analyzer 2.60) may need none
                lib_dir = None
        return cls(Path(chosen), lib_dir)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib_dir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env

    def version(self) -> str:
        """perf_analyzer has no --version flag in 2.50; the cache folder names the wheel it came from."""
        match = re.search(r"perf_analyzer-(\d+\.\d+\.\d+)", str(self.binary.parent))
        return match.group(1) if match else os.environ.get("MTL_PERF_ANALYZER_VERSION", "unknown")


@dataclass(frozen=True)
class Measurement:
    """One concurrency level of one workload, as perf_analyzer's CSV reports it (latencies in µs)."""

    sentences_per_request: int
    concurrency: int
    sentences_per_s: float
    requests_per_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    client_send_us: float
    client_recv_us: float
    server_queue_us: float
    server_compute_input_us: float
    server_compute_infer_us: float
    server_compute_output_us: float

    def as_row(self) -> dict:
        return asdict(self)


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    if value in (None, ""):
        return float("nan")
    return float(value)


def parse_csv(path: Path, sentences_per_request: int) -> list[Measurement]:
    """perf_analyzer's -f CSV (rows sorted by throughput) → measurements sorted by concurrency."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise PerfError(f"perf_analyzer wrote no CSV at {path}: {exc.strerror}") from None
    if not rows or "Inferences/Second" not in rows[0] or "p99 latency" not in rows[0]:
        raise PerfError(f"{path} is not a perf_analyzer CSV with throughput and p99 columns")
    results = []
    for row in rows:
        rate = _number(row, "Inferences/Second")
        results.append(
            Measurement(
                sentences_per_request=sentences_per_request,
                concurrency=int(_number(row, "Concurrency")),
                sentences_per_s=rate,
                # perf_analyzer counts each row of a batch as one inference.
                requests_per_s=rate / sentences_per_request,
                p50_us=_number(row, "p50 latency"),
                p90_us=_number(row, "p90 latency"),
                p95_us=_number(row, "p95 latency"),
                p99_us=_number(row, "p99 latency"),
                client_send_us=_number(row, "Client Send"),
                client_recv_us=_number(row, "Client Recv"),
                server_queue_us=_number(row, "Server Queue"),
                server_compute_input_us=_number(row, "Server Compute Input"),
                server_compute_infer_us=_number(row, "Server Compute Infer"),
                server_compute_output_us=_number(row, "Server Compute Output"),
            )
        )
    return sorted(results, key=lambda m: m.concurrency)


def check_output(text: str, returncode: int, command: list[str]) -> None:
    """Fail on a non-zero exit or on any error line, even when perf_analyzer exited 0."""
    problems = [line.strip() for line in text.splitlines() if any(p.search(line) for p in ERROR_PATTERNS)]
    if returncode != 0 or problems:
        shown = "\n".join(problems[-8:]) or "\n".join(text.strip().splitlines()[-8:])
        raise PerfError(f"perf_analyzer failed (exit code {returncode}): {' '.join(command)}\n{shown}")


@dataclass(frozen=True)
class RunSettings:
    measurement_ms: int = 2000
    max_trials: int = 4
    stability_percent: int = 25
    timeout_s: float = 180.0


def run(
    analyzer: PerfAnalyzer,
    *,
    model: str,
    url: str,
    input_json: Path,
    sentences_per_request: int,
    concurrency: int,
    csv_path: Path,
    log_path: Path,
    settings: RunSettings = RunSettings(),
) -> Measurement:
    """One perf_analyzer run at one concurrency over gRPC; its CSV at csv_path, its output at log_path."""
    command = [
        str(analyzer.binary),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--input-data",
        str(input_json),
        "-b",
        str(sentences_per_request),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        str(settings.measurement_ms),
        "--max-trials",
        str(settings.max_trials),
        "--stability-percentage",
        str(settings.stability_percent),
        "-f",
        str(csv_path),
    ]
    csv_path.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=settings.timeout_s,
            env=analyzer.environment(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log_path.write_text(output)
        raise PerfError(f"perf_analyzer did not finish in {settings.timeout_s:.0f}s: {' '.join(command)}") from None
    except OSError as exc:
        raise PerfError(f"cannot run {analyzer.binary}: {exc}") from None
    output = result.stdout + result.stderr
    log_path.write_text(
        f"$ {' '.join(command)}\n# {time.monotonic() - started:.1f}s, exit code {result.returncode}\n{output}"
    )
    check_output(output, result.returncode, command)
    measurements = parse_csv(csv_path, sentences_per_request)
    if len(measurements) != 1:
        raise PerfError(f"{csv_path}: expected one row for concurrency {concurrency}, found {len(measurements)}")
    measurement = measurements[0]
    if not measurement.sentences_per_s > 0:
        raise PerfError(f"{csv_path}: throughput is {measurement.sentences_per_s} at concurrency {concurrency}")
    return measurement
