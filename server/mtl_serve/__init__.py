"""mtl-serve: the real Triton server from the nvidia-pytriton wheel, run locally without Docker."""
from .local import LocalTriton, ServerError

__all__ = ["LocalTriton", "ServerError"]
