"""What the build decided, as the served model reads it back from Triton's model config (config.pbtxt).

The build writes these as config.pbtxt parameters; Triton hands model.py the same config as a dict, and
the build, the tools and the tests read config.pbtxt back into that dict before opening a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

INPUT_NAME = "TEXT"
TRUNCATED_NAME = "TRUNCATED"
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ServingSpec:
    tasks: tuple[TaskSpec, ...]
    max_tokens: int
    normalize: bool = True
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "auto"  # auto | float32 (see pick_dtype)
    runtime: str = "auto"  # auto | torch | openvino | onnxruntime (see runtimes.pick_runtime)
    tokens_per_forward: int = 0  # padded tokens per forward; 0 = the device's default (runtimes.tokens_per_forward)
    instance_count: int = 1
    max_request_bytes: int = 16 * 1024 * 1024  # text bytes in one request; four times the client's request budget
    threads: int = 0  # threads of one CPU instance; 0 = the cores split between the instances

    @classmethod
    def from_model_config(cls, model_config: dict) -> ServingSpec:
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        instances = sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])) or 1
        try:
            tasks = tuple(TaskSpec(t["name"], tuple(t["labels"])) for t in json.loads(params["tasks"]))
            spec = cls(
                tasks,
                int(params["max_tokens"]),
                params.get("normalize", "true") == "true",
                params.get("device", "auto"),
                params.get("precision", "auto"),
                params.get("runtime", "auto"),
                int(params.get("tokens_per_forward", "0")),
                instances,
                int(params.get("max_request_bytes", str(cls.max_request_bytes))),
                int(params.get("threads", "0")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"model config parameters are incomplete or malformed ({exc!r}); rebuild with mtl-build"
            ) from exc
        if spec.threads < 0:
            raise ValueError(f"model config parameter threads is {spec.threads}; expected 0 (auto) or more")
        if spec.runtime not in RUNTIMES:
            raise ValueError(f"model config parameter runtime is {spec.runtime!r}; expected one of {RUNTIMES}")
        return spec


def cpu_has_fast_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AMX or AVX512-BF16: oneDNN runs bfloat16 matmuls about twice as fast as float32 there (and slower without)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    if setting == "gpu":
        raise RuntimeError("serving.device is 'gpu' but torch sees no CUDA device")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str) -> torch.dtype:
    """float32, or with precision auto the fast reduced type of the device: float16 on a GPU, bfloat16 on a
    CPU that has AMX/AVX512-BF16. The build records how often reduced-precision labels equal float32 ones."""
    if precision == "float32":
        return torch.float32
    if precision != "auto":
        raise ValueError(f"serving precision must be 'auto' or 'float32', got {precision!r}")
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32


def threads_per_instance(instances: int, available: int) -> int:
    """Threads for one CPU instance: each instance is its own process, so they split the cores between them.
    Two instances of 2 threads each on 2 cores fell to 3 requests/s in the sweep (spinning OpenMP threads)."""
    return max(1, available // max(1, instances))
