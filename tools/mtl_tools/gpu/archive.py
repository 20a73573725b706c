"""xz archives for the carry: every byte counts against the device call's 64 MiB."""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path


def xz_bytes(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def xz_tar(target: Path, members: list[tuple[Path, str]]) -> Path:
    """A tar.xz of (path, name in archive); `xz -9e -T0` when present (multi-threaded), else Python's lzma."""
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, name in members:
            archive.add(path, arcname=name)
    raw = buffer.getvalue()
    if shutil.which("xz"):
        result = subprocess.run(["xz", "-9e", "-T0", "-c"], input=raw, capture_output=True, check=True)
        target.write_bytes(result.stdout)
    else:
        target.write_bytes(xz_bytes(raw))
    return target


def extract(archive_path: Path, destination: Path) -> None:
    with tarfile.open(archive_path) as archive:
        archive.extractall(destination, filter="tar")
