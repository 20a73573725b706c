"""Variants of a built model's batching settings, served side by side from one model repository.

Each variant is a copy of the model's generated config.pbtxt under a new model name, with its own
instance count, dynamic-batching queue delay and preferred batch sizes; its version folder is a
symlink to the built one, so the weights are not copied. One Triton start then serves every variant.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path


class VariantError(ValueError):
    pass


@dataclass(frozen=True)
class Variant:
    instance_count: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]

    @property
    def name(self) -> str:
        preferred = "-".join(map(str, self.preferred_batch_sizes)) or "none"
        return f"i{self.instance_count}_d{self.max_queue_delay_us}_p{preferred}"

    def describe(self) -> dict:
        return {"variant": self.name, "instance_count": self.instance_count,
                "max_queue_delay_us": self.max_queue_delay_us,
                "preferred_batch_sizes": " ".join(map(str, self.preferred_batch_sizes)) or "none"}


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


def grid(instances: list[int], delays: list[int], preferred: list[tuple[int, ...]]) -> list[Variant]:
    return [Variant(i, d, p) for i, d, p in product(instances, delays, preferred)]


_NAME = re.compile(r'^name:\s*"[^"]*"\s*$', re.MULTILINE)
_MAX_BATCH = re.compile(r"^max_batch_size:\s*(\d+)\s*$", re.MULTILINE)
_DYNAMIC = re.compile(r"^dynamic_batching\s*\{.*?^\}\s*$", re.MULTILINE | re.DOTALL)
_INSTANCES = re.compile(r"^instance_group\s*\[\s*\{\s*kind:\s*(KIND_\w+)\s+count:\s*\d+\s*\}\s*\]\s*$", re.MULTILINE)


def _replace_once(pattern: re.Pattern, replacement, text: str, what: str) -> str:
    new, count = pattern.subn(replacement, text)
    if count != 1:
        raise VariantError(f"config.pbtxt: expected exactly one {what}, found {count}; rebuild it with mtl-build")
    return new


def apply(config_text: str, variant: Variant, name: str) -> str:
    """config.pbtxt as written by mtl-build, with `name` and the variant's batching settings."""
    match = _MAX_BATCH.search(config_text)
    if not match:
        raise VariantError("config.pbtxt: no max_batch_size")
    too_big = [s for s in variant.preferred_batch_sizes if s > int(match.group(1))]
    if too_big:
        raise VariantError(f"preferred batch sizes {too_big} exceed max_batch_size {match.group(1)}")
    if variant.instance_count < 1 or variant.max_queue_delay_us < 0:
        raise VariantError(f"{variant.name}: instance count must be >= 1 and queue delay >= 0")
    text = _replace_once(_NAME, f'name: "{name}"', config_text, "model name")
    preferred = (f"\n  preferred_batch_size: [ {', '.join(map(str, variant.preferred_batch_sizes))} ]"
                 if variant.preferred_batch_sizes else "")
    dynamic = f"dynamic_batching {{\n  max_queue_delay_microseconds: {variant.max_queue_delay_us}{preferred}\n}}"
    text = _replace_once(_DYNAMIC, lambda _m: dynamic, text, "dynamic_batching block")
    return _replace_once(_INSTANCES, lambda m: f"instance_group [ {{ kind: {m.group(1)} count: {variant.instance_count} }} ]",
                         text, "instance_group line")


def read_settings(config_text: str) -> dict:
    """The batching settings a config.pbtxt holds (for reports)."""
    delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", config_text)
    preferred = re.search(r"preferred_batch_size:\s*\[([^\]]*)\]", config_text)
    instances = re.search(r"instance_group\s*\[\s*\{\s*kind:\s*(KIND_\w+)\s+count:\s*(\d+)", config_text)
    max_batch = _MAX_BATCH.search(config_text)
    return {
        "max_batch_size": int(max_batch.group(1)) if max_batch else None,
        "max_queue_delay_us": int(delay.group(1)) if delay else None,
        "preferred_batch_sizes": " ".join(preferred.group(1).replace(",", " ").split()) if preferred else "none",
        "instance_kind": instances.group(1) if instances else None,
        "instance_count": int(instances.group(2)) if instances else None,
    }


def build_repository(source: Path, model: str, variants: list[Variant], destination: Path) -> dict[str, Variant]:
    """destination/<variant name>/{config.pbtxt, 1 -> source/model/1}; returns {model name: variant}."""
    model_dir = source.resolve() / model
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        raise VariantError(f"{config} does not exist: build the model repository first (mtl-build)")
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise VariantError(f"{model_dir} has no version folder")
    text = config.read_text(encoding="utf-8")
    destination.mkdir(parents=True, exist_ok=True)
    served = {}
    for variant in variants:
        name = f"{model}__{variant.name}"
        if name in served:
            raise VariantError(f"variant {variant.name} is listed twice")
        folder = destination / name
        folder.mkdir(exist_ok=True)
        (folder / "config.pbtxt").write_text(apply(text, variant, name), encoding="utf-8")
        for version in versions:
            link = folder / version.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(version, target_is_directory=True)
        served[name] = variant
    return served
