"""mtl-serve: the real Triton server from the nvidia-pytriton wheel, run locally without Docker."""
import logging

from .local import LocalTriton, ServerError

# A library logs; the application (mtl-serve's CLI) decides where to.
logging.getLogger("mtl_serve").addHandler(logging.NullHandler())

__all__ = ["LocalTriton", "ServerError"]
