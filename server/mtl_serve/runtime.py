"""The bundled Triton's files: where the wheel keeps them, the private runtime copy, the stub environment.

See docs/triton-local.md for why each step exists: a private copy of the binary with the stub for this
Python, LD_LIBRARY_PATH with the wheel's libraries and this Python's LIBDIR, and a stub environment
(numpy<2, torch, tokenizers) chosen through PATH because the stub ignores PYTHONPATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

TRITON_VERSION = "2.51.0"
STUB_NAME = "triton_python_backend_stub"
# Modules the served model.py imports inside the stub.
STUB_MODULES = ("numpy", "torch", "tokenizers", "safetensors", "emoji")
# What each runtime of the served core imports besides them (multitask_core.runtimes).
RUNTIME_MODULES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime",)}
# tritonserver reads options from its command line only, which every local user can read in
# /proc/PID/cmdline. This library, preloaded into it, swaps argv[i] for the environment variable
# HIDDEN_ARG_PREFIX<i> before main() runs (the environment is readable by the same user only).
HIDDEN_ARG_PREFIX = "MTL_TRITON_ARGV_"
PRELOAD_REST = "MTL_TRITON_PRELOAD_REST"
HIDDEN_ARGS_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*main_fn)(int, char **, char **);
typedef int (*start_fn)(main_fn, int, char **, void (*)(void), void (*)(void), void (*)(void), void *);
static main_fn real_main;

static int main_with_hidden_args(int argc, char **argv, char **envp) {
    char name[64];
    for (int i = 1; i < argc; i++) {
        snprintf(name, sizeof name, "%s%d", "@PREFIX@", i);
        char *value = getenv(name);
        char *copy = value ? strdup(value) : NULL;
        if (copy == NULL) continue;
        argv[i] = copy;
        /* /proc/PID/environ shows the original block, not the current environment: blank it there too. */
        memset(value, '*', strlen(value));
        unsetenv(name);
    }
    /* The python-backend stubs that tritonserver starts do not need this library. */
    char *rest = getenv("@REST@");
    if (rest != NULL && *rest) setenv("LD_PRELOAD", rest, 1); else unsetenv("LD_PRELOAD");
    unsetenv("@REST@");
    return real_main(argc, argv, envp);
}

int __libc_start_main(main_fn main, int argc, char **argv, void (*init)(void), void (*fini)(void),
                      void (*rtld_fini)(void), void *stack_end) {
    start_fn next = (start_fn)dlsym(RTLD_NEXT, "__libc_start_main");
    real_main = main;
    return next(main_with_hidden_args, argc, argv, init, fini, rtld_fini, stack_end);
}
""".replace("@PREFIX@", HIDDEN_ARG_PREFIX).replace("@REST@", PRELOAD_REST)

logger = logging.getLogger("mtl_serve.runtime")


class ServerError(RuntimeError):
    """The local Triton server could not be started, or stopped working."""


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cache_dir() -> Path:
    base = os.environ.get("MTL_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "mtl-triton"
    )
    return Path(base)


def wheel_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs) inside site-packages."""
    try:
        import pytriton
    except ImportError:
        raise ServerError(
            "the nvidia-pytriton package (which carries the Triton binary) is not installed: "
            "pip install nvidia-pytriton==0.7.0"
        ) from None
    package = Path(pytriton.__file__).resolve().parent
    server, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServerError(f"no tritonserver binary under {server}: the nvidia-pytriton install is incomplete")
    return server, libs


def prepare_runtime(target: Path | None = None) -> Path:
    """A private copy of the server with this Python's stub in backends/python; made once, then reused."""
    source, _ = wheel_paths()
    version = python_version()
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


def hidden_args_library(runtime: Path) -> Path | None:
    """The preload library that keeps secret options out of tritonserver's command line, built once with
    the C compiler ($CC or cc); None (with a warning) when there is no compiler or the build fails."""
    library = runtime / "lib" / "mtl-hidden-args.so"
    if library.is_file():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning(
            "no C compiler (cc): secret tritonserver options stay on its command line, readable by "
            "every local user in /proc/PID/cmdline"
        )
        return None
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as work:
            source, built = Path(work) / "hidden_args.c", Path(work) / "hidden_args.so"
            source.write_text(HIDDEN_ARGS_SOURCE)
            result = subprocess.run(
                [compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source), "-ldl"],
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                built.replace(library)
                return library
            problem = result.stderr.strip()[-400:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    logger.warning(
        "building the hidden-arguments library failed; secret tritonserver options stay on its command line: %s",
        problem,
    )
    return None


def runtime_environment(stub_python: Path) -> dict[str, str]:
    """This process's environment, adjusted so that tritonserver and its stubs find their libraries and Python."""
    _, libs = wheel_paths()
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    # The stub takes sys.prefix and site-packages from the first python3 on PATH.
    env["PATH"] = os.pathsep.join((str(stub_python.parent), env.get("PATH", "")))
    env.pop("PYTHONPATH", None)
    return env


def check_stub_environment(python: Path, runtimes: tuple[str, ...] = ()) -> str:
    """Prove the stub's Python can import the model's modules with numpy<2, and really import each runtime
    package in `runtimes` beside that numpy (a wheel built for numpy 2 fails there); return the numpy version."""
    probe = (
        "import importlib, importlib.util, sys\n"
        f"mods = {STUB_MODULES + tuple(runtimes)!r}\n"
        "missing = [m for m in mods if importlib.util.find_spec(m) is None]\n"
        "if missing: sys.exit('missing modules: ' + ', '.join(missing))\n"
        "import numpy\n"
        f"for m in {tuple(runtimes)!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except Exception as e: sys.exit(f'runtime {m} does not import beside numpy {numpy.__version__}: {e!r}')\n"
        "print(numpy.__version__)\n"
    )
    try:
        result = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True, timeout=120)
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
