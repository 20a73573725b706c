"""mtl-serve: the real Triton server from the nvidia-pytriton wheel, run locally without Docker."""

import logging

from .local import ADMIN_HEADER, GRPC_ADMIN_HEADER, LocalTriton, Recovery, model_names
from .procs import free_port, group_members, port_is_free
from .runtime import TRITON_VERSION, ServerError, cache_dir, check_stub_environment, prepare_runtime, wheel_paths

# A library logs; the application (mtl-serve's CLI) decides where to.
logging.getLogger("mtl_serve").addHandler(logging.NullHandler())

__all__ = [
    "ADMIN_HEADER",
    "GRPC_ADMIN_HEADER",
    "TRITON_VERSION",
    "LocalTriton",
    "Recovery",
    "ServerError",
    "cache_dir",
    "check_stub_environment",
    "free_port",
    "group_members",
    "model_names",
    "port_is_free",
    "prepare_runtime",
    "wheel_paths",
]
