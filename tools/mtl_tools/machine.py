"""What ran a measurement: the CPU by name and by the features that decide int8/bfloat16 speed, the GPU, the
load, the package versions and the commit. Every report names these."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .paths import ROOT

# CPU flags that decide which int8 and bfloat16 kernels oneDNN, OpenVINO and ONNX Runtime can use.
FEATURES = {
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
VERSIONED = (
    "torch",
    "numpy",
    "tokenizers",
    "transformers",
    "sentence-transformers",
    "onnxruntime",
    "openvino",
    "nncf",
    "tritonclient",
    "mtl-client",
    "nvidia-pytriton",
)


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields (model name, cpu family, model, flags)."""
    fields: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def amd_generation(family: int, flags: set[str]) -> str | None:
    """Zen generation from the CPU family: 0x19 is Zen 3 or Zen 4 (only Zen 4 has AVX-512), 0x1A Zen 5."""
    if family == 0x19:
        return "Zen 4" if "avx512f" in flags else "Zen 3"
    return {0x17: "Zen / Zen 2", 0x1A: "Zen 5"}.get(family)


def describe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    name = info.get("model name") or platform.processor() or "unknown"
    generation = None
    if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family", "").isdigit():
        generation = amd_generation(int(info["cpu family"]), flags)
    present = [label for flag, label in FEATURES.items() if flag in flags]
    summary = f"{name}{f' ({generation})' if generation else ''}, {os.cpu_count()} cores"
    summary += ", " + (", ".join(present) if present else "no AVX-512")
    if not flags & {"amx_bf16", "amx_int8"}:
        summary += ", no AMX"
    return {"cpu": name, "generation": generation, "cores": os.cpu_count(), "features": present, "summary": summary}


def gpu_name() -> str | None:
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


def machine() -> dict:
    """CPU, cores, load and the GPU when nvidia-smi sees one."""
    cpu = describe_cpu()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu["cpu"],
        "cpu_summary": cpu["summary"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    gpu = gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    from .triton import TRITON_VERSION

    found["triton_server"] = TRITON_VERSION
    return found


def commit() -> str:
    """The checkout's commit (short hash), or "unknown" outside a git checkout (the GPU machine's copy)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"
