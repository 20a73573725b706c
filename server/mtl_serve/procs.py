"""Processes and what they hold, read from /proc: command lines, start times, states, process groups,
signals, the python backend's shared-memory regions, and free ports."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

SHM_FOLDER = Path("/dev/shm")
# The python backend's per-instance region: one per stub, mapped by the stub and by tritonserver.
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
_SHM_REGION = re.compile(rf"{re.escape(str(SHM_FOLDER))}/({re.escape(SHM_REGION_PREFIX)}[\w.-]+)")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/PID/stat (after the parenthesised command name), or [] when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), or "" when it is gone or a zombie."""
    fields = _stat_fields(pid)
    return "" if not fields or fields[0] in ("Z", "X") else fields[19]


def is_stopped(pid: int) -> bool:
    """Stopped by a signal (T) or by a tracer (t): it runs no code until continued."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] in ("T", "t")


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time the process has used, in clock ticks (0 when it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # Field 5 is the process group id.
        if fields and int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_group_gone(group: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)


def shm_regions(pids: list[int]) -> set[str]:
    """Names of the python-backend shared-memory regions in /dev/shm that these processes map."""
    names: set[str] = set()
    for pid in pids:
        try:
            names.update(_SHM_REGION.findall(Path(f"/proc/{pid}/maps").read_text()))
        except OSError:
            continue
    return names


def remove_shm_regions(names: set[str]) -> list[str]:
    """Unlink these regions from /dev/shm; the names of those that were still there."""
    removed = []
    for name in sorted(names):
        try:
            (SHM_FOLDER / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            continue
    return removed


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    for address in (host, "0.0.0.0"):  # Triton binds 0.0.0.0 too
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
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
