"""Typed view of config.yaml: parsed and validated once, then passed around as objects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BuildError

# Triton tensor names and our output file template both embed the task name.
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Names the model already uses for its own tensors.
RESERVED_TENSOR_NAMES = {"TEXT", "TRUNCATED"}


class ConfigError(BuildError, ValueError):
    """config.yaml is missing, unparsable or holds a wrong value."""


class _Strict(BaseModel):
    # An unknown key is almost always a typo; say so instead of ignoring it.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Strict):
    path: Path | None = None
    sha256: dict[str, str]
    pooling: Literal["mean"] = "mean"
    normalize: bool = True
    max_tokens: int = Field(256, ge=8, le=512)

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            if name not in value:
                raise ValueError(f"needs a digest for {name!r}")
        for name, digest in value.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{name!r}: {digest!r} is not a lowercase hex SHA-256 (64 characters)")
        return value


class TaskConfig(_Strict):
    name: str
    labels: list[str] = Field(min_length=2)
    descriptions: dict[str, str] = {}

    @field_validator("name")
    @classmethod
    def _name_is_tensor_safe(cls, value: str) -> str:
        if not TASK_NAME.match(value):
            raise ValueError(f"{value!r} must match {TASK_NAME.pattern} (it names a Triton output tensor)")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"labels must be unique, got {value}")
        if any(not label.strip() for label in value):
            raise ValueError("labels must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _descriptions_name_labels(self) -> TaskConfig:
        unknown = set(self.descriptions) - set(self.labels)
        if unknown:
            raise ValueError(f"descriptions name unknown labels {sorted(unknown)}; valid: {self.labels}")
        return self


class DataConfig(_Strict):
    train: Path = Path("data/train.csv")
    validation: Path = Path("data/validation.csv")
    # Scored by the build and reported apart; never used for training or model selection. null: none.
    challenge: Path | None = None
    text_column: str = "text"
    # Optional column naming each row's kind of text; the build reports per register when it is there.
    register_column: str = "register"


class TrainingConfig(_Strict):
    # The defaults are the shipped config.yaml's values (chosen on validation, docs/training.md).
    mode: Literal["heads_only", "joint"] = "joint"
    seed: int = 13
    epochs: int = Field(30, ge=1)  # heads_only
    joint_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.002, gt=0)  # heads
    encoder_learning_rate: float = Field(8e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    # Joint mode: the embeddings and this many bottom layers stay pre-trained; their output is computed once.
    frozen_layers: int = Field(0, ge=0, le=64)
    # Joint mode with frozen_layers 0: also keep the token, position and type embeddings as pre-trained
    # (their optimiser state is half the model's parameters).
    train_embeddings: bool = True
    # Layer-wise learning-rate decay: layer i below the top trains at encoder_learning_rate * decay**i.
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_balanced: bool = False  # weight each class's loss by its inverse frequency
    early_stopping: bool = True  # keep the epoch with the best validation macro-F1
    patience: int = Field(1, ge=0)
    # bfloat16 autocast: auto = on a CPU with AMX/AVX512-BF16 (about 2x faster there)
    autocast: Literal["auto", "bfloat16", "off"] = "auto"
    calibrate: bool = True  # fit one temperature per task on the validation split
    task_weights: dict[str, float] = {}


class ServingConfig(_Strict):
    model_name: str = "multitask"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # auto: float16 on a GPU, bfloat16 on a CPU with AMX or AVX512-BF16 (labels checked against float32 at build
    # time), float32 elsewhere; float32 everywhere gives results equal to transformers within 1e-4.
    precision: Literal["auto", "float32"] = "auto"
    # auto: OpenVINO int8 on a CPU, torch elsewhere (multitask_core.runtimes.pick_runtime)
    runtime: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    # Padded tokens in one forward; 0 = the device's default (1,024 on a CPU, 65,536 on a GPU).
    tokens_per_forward: int = Field(0, ge=0)
    # Threads of one CPU instance; 0 = the machine's cores split between the instances.
    threads_per_instance: int = Field(0, ge=0)
    # An exported graph (ONNX, OpenVINO int8) must give the float32 labels on this share of the validation rows
    # of every task, or the build fails (or, when another runtime serves, leaves the graph out).
    min_label_agreement: float = Field(0.995, ge=0.5, le=1.0)
    # Text bytes one request may hold; the model refuses more before decoding (the client sends at most 4 MiB).
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(256, ge=1, le=4096)
    max_queue_delay_microseconds: int = Field(2000, ge=0)
    preferred_batch_sizes: list[int] = [64, 128, 256]
    instance_count: int = Field(1, ge=1, le=64)
    output_filename: str = "{task}_predictions.csv"

    @field_validator("output_filename")
    @classmethod
    def _template_has_task(cls, value: str) -> str:
        if "{task}" not in value or "/" in value:
            raise ValueError(f"{value!r} must contain '{{task}}' and no '/'")
        return value

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ServingConfig:
        too_big = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} must lie in 1..max_batch_size ({self.max_batch_size})")
        return self


class ProjectConfig(_Strict):
    backbone: BackboneConfig
    tasks: list[TaskConfig] = Field(min_length=1)
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    serving: ServingConfig = ServingConfig()
    # Relative data paths are read from the folder that holds config.yaml.
    root: Path = Path(".")

    @model_validator(mode="after")
    def _cross_checks(self) -> ProjectConfig:
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        clash = RESERVED_TENSOR_NAMES & {name.upper() for name in names}
        if clash:
            raise ValueError(
                f"task names {sorted(clash)} clash with the model's own tensors {sorted(RESERVED_TENSOR_NAMES)}"
            )
        unknown = set(self.training.task_weights) - set(names)
        if unknown:
            raise ValueError(f"training.task_weights names unknown tasks {sorted(unknown)}; valid: {names}")
        return self

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path

    def task_weight(self, name: str) -> float:
        return self.training.task_weights.get(name, 1.0)


def _describe(error: ValidationError) -> str:
    """One line per problem: the dotted key, the value given, and what is allowed."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = item["msg"]
        if item["type"] == "literal_error":
            message = f"must be one of {item['ctx']['expected']}"
        elif item["type"] == "extra_forbidden":
            message = "is not a known key (typo?)"
        given = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path) -> ProjectConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("root", str(path.resolve().parent))
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration\n{_describe(exc)}") from None
