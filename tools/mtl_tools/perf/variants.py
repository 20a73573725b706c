"""Variants of a built model's serving layout, served side by side from one model repository.

Each variant is the model's config.pbtxt read through Triton's schema (mtl_build.pbtxt), edited as a dict
(name, instance count, threads per instance, tokens per forward, queue delay, preferred batch sizes) and
written back through the schema; its version folder is a symlink to the built one, so nothing is copied.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from mtl_build import pbtxt

# The served core reads these config.pbtxt parameters (multitask_core.spec.ServingSpec); "threads" is the one
# the sweep asks for in addition (0 or absent: threads_per_instance, the cores split between the instances).
TOKENS_PARAMETER = "tokens_per_forward"
THREADS_PARAMETER = "threads"


class VariantError(ValueError):
    pass


@dataclass(frozen=True)
class Variant:
    instance_count: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    threads: int = 0  # per instance; 0 = the served core's default (cores // instances)
    tokens_per_forward: int = 0  # padded tokens per forward; 0 = the device's default

    @property
    def name(self) -> str:
        preferred = "-".join(map(str, self.preferred_batch_sizes)) or "none"
        return (
            f"i{self.instance_count}_t{self.threads or 'auto'}_k{self.tokens_per_forward or 'auto'}"
            f"_d{self.max_queue_delay_us}_p{preferred}"
        )

    def describe(self) -> dict:
        return {
            "variant": self.name,
            "instance_count": self.instance_count,
            "threads": self.threads or "auto",
            "tokens_per_forward": self.tokens_per_forward or "auto",
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": " ".join(map(str, self.preferred_batch_sizes)) or "none",
        }


def parse_preferred(spec: str) -> tuple[int, ...]:
    """'64,128,256' → (64, 128, 256); 'none' → () (no preferred sizes: batch whatever is queued)."""
    if spec.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise VariantError(f"preferred batch sizes {spec!r}: expected comma-separated integers or 'none'") from None
    if not sizes or min(sizes) < 1:
        raise VariantError(f"preferred batch sizes {spec!r}: each must be >= 1")
    return sizes


def grid(
    instances: list[int],
    delays: list[int],
    preferred: list[tuple[int, ...]],
    threads: list[int] = (0,),
    tokens: list[int] = (0,),
) -> list[Variant]:
    """Every combination, in the order instances x threads x tokens per forward x delay x preferred sizes."""
    return [Variant(i, d, p, t, k) for i, t, k, d, p in product(instances, threads, tokens, delays, preferred)]


def read_settings(model_config: dict) -> dict:
    """The serving settings a model config holds (for reports): batching, instances, runtime and parameters."""
    batching = model_config.get("dynamic_batching", {})
    groups = model_config.get("instance_group", [])
    parameters = {key: value.get("string_value") for key, value in model_config.get("parameters", {}).items()}
    return {
        "max_batch_size": int(model_config.get("max_batch_size", 0)) or None,
        "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
        "preferred_batch_sizes": " ".join(str(s) for s in batching.get("preferred_batch_size", [])) or "none",
        "instance_kind": groups[0].get("kind", "KIND_AUTO") if groups else None,
        "instance_count": sum(int(g.get("count", 1)) for g in groups) if groups else None,
        "runtime": parameters.get("runtime"),
        "precision": parameters.get("precision"),
        "tokens_per_forward": int(parameters.get(TOKENS_PARAMETER) or 0) or "auto",
        "threads": int(parameters.get(THREADS_PARAMETER) or 0) or "auto",
    }


def apply(model_config: dict, variant: Variant, name: str) -> dict:
    """A copy of the model config with `name` and the variant's settings; the rest is left as the build wrote it."""
    if (
        variant.instance_count < 1
        or variant.max_queue_delay_us < 0
        or variant.threads < 0
        or variant.tokens_per_forward < 0
    ):
        raise VariantError(f"{variant.name}: instance count must be >= 1; threads, tokens and queue delay >= 0")
    max_batch = int(model_config.get("max_batch_size", 0))
    too_big = [s for s in variant.preferred_batch_sizes if s > max_batch]
    if too_big:
        raise VariantError(f"preferred batch sizes {too_big} exceed max_batch_size {max_batch}")
    if "dynamic_batching" not in model_config:
        raise VariantError("the model config has no dynamic_batching block; rebuild it with mtl-build")
    groups = model_config.get("instance_group", [])
    if len(groups) != 1:
        raise VariantError(
            f"the model config has {len(groups)} instance groups, expected exactly one; rebuild it with mtl-build"
        )
    config = copy.deepcopy(model_config)
    config["name"] = name
    # uint64 fields are strings in the schema's JSON form (as read_config gives them)
    batching = {"max_queue_delay_microseconds": str(variant.max_queue_delay_us)}
    if variant.preferred_batch_sizes:
        batching["preferred_batch_size"] = list(variant.preferred_batch_sizes)
    config["dynamic_batching"] = batching
    config["instance_group"][0]["count"] = variant.instance_count
    parameters = config.setdefault("parameters", {})
    parameters[TOKENS_PARAMETER] = {"string_value": str(variant.tokens_per_forward)}
    if variant.threads:
        parameters[THREADS_PARAMETER] = {"string_value": str(variant.threads)}
    else:
        parameters.pop(THREADS_PARAMETER, None)
    pbtxt.to_text(config)  # the schema refuses a field Triton would refuse
    return config


def build_repository(source: Path, model: str, variants: list[Variant], destination: Path) -> dict[str, Variant]:
    """destination/<model>__<variant>/{config.pbtxt, 1 -> source/model/1}; returns {model name: variant}."""
    model_dir = source.resolve() / model
    base = pbtxt.read_config(model_dir)
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise VariantError(f"{model_dir} has no version folder")
    destination.mkdir(parents=True, exist_ok=True)
    served = {}
    for variant in variants:
        name = f"{model}__{variant.name}"
        if name in served:
            raise VariantError(f"variant {variant.name} is listed twice")
        folder = destination / name
        folder.mkdir(exist_ok=True)
        pbtxt.write_config(apply(base, variant, name), folder / pbtxt.CONFIG_FILE)
        for version in versions:
            link = folder / version.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(version, target_is_directory=True)
        served[name] = variant
    return served


# model.py logs one line per instance when it is ready; a CPU runtime names its thread count there.
_READY_THREADS = re.compile(r"multitask ready: [^\n]*?\((\d+) threads")


def threads_check(log_text: str, variants: list[Variant], cores: int) -> str | None:
    """None when the instances' logged thread counts are exactly what the variants ask for; else what differs.

    The log does not say which model a ready line belongs to, so the counts are compared as a multiset: every
    instance of a variant with threads N should log N, an `auto` one cores // instances."""
    logged = Counter(int(n) for n in _READY_THREADS.findall(log_text))
    if not logged:
        asked = any(variant.threads for variant in variants)
        return (
            (
                "the served model logged no thread counts (a GPU runtime names none): the threads asked for are "
                "unverified"
            )
            if asked
            else None
        )
    wanted = Counter()
    for variant in variants:
        wanted[variant.threads or max(1, cores // variant.instance_count)] += variant.instance_count
    if logged == wanted:
        return None
    return (
        f"threads per instance asked for {dict(sorted(wanted.items()))} (threads: instances), the instances "
        f"logged {dict(sorted(logged.items()))}: the served core does not read the '{THREADS_PARAMETER}' "
        "parameter, so the threads column is what was asked, not what ran"
    )
