"""The local-Triton helpers of mtl_serve the tools use, imported in this one place.

mtl_serve exports only LocalTriton and ServerError; the runtime helpers below live in its modules. When they
move, this file is the only one to change.
"""

from __future__ import annotations

from mtl_serve import TRITON_VERSION, LocalTriton, ServerError, cache_dir, check_stub_environment, wheel_paths

__all__ = [
    "LocalTriton",
    "ServerError",
    "TRITON_VERSION",
    "cache_dir",
    "check_stub_environment",
    "wheel_paths",
    "server_pids",
]


def server_pids(server: LocalTriton) -> list[int]:
    """Triton and its python-backend stubs: whose CPU time a request through the server costs."""
    return ([server.pid] if server.pid else []) + server.stub_pids()
