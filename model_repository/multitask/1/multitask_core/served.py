"""The served model: one object that opens a version folder and owns everything between text and labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files
from .runtimes import Runtime, open_runtime
from .spec import ServingSpec
from .text import Batch, TextEncoder, decode_texts


@dataclass
class Scores:
    probabilities: dict[str, np.ndarray]  # task -> float32 [rows, labels], calibrated
    truncated: np.ndarray  # bool [rows]


class ServedModel:
    """A model-repository version folder, opened as Triton's model.py opens it.

    It owns the tokenization (normalisation, `max_tokens`, the character clip), the runtime with its
    device, dtype and threads, and the per-forward token cap. Callers never pass a limit again.
    """

    def __init__(self, folder: Path, spec: ServingSpec, text: TextEncoder, runtime: Runtime):
        self.folder, self.spec, self.text, self.runtime = folder, spec, text, runtime

    @classmethod
    def open(cls, folder: Path, model_config: dict, *, verify: bool = True, **overrides) -> ServedModel:
        """`model_config` is the dict Triton hands model.py (mtl_build.pbtxt.read_config gives the same).
        `overrides` (runtime, device, precision, threads, token_cap) replace what the config says."""
        folder = Path(folder)
        if verify:
            files.verify_artifacts(folder)
        spec = ServingSpec.from_model_config(model_config)
        text = TextEncoder(folder / files.TOKENIZER_FILE, spec.max_tokens)
        return cls(folder, spec, text, open_runtime(folder, spec, **overrides))

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.spec.tasks]

    @property
    def max_tokens(self) -> int:
        return self.text.max_tokens

    def describe(self) -> str:
        return (
            f"{self.runtime.describe()}, tokens per forward {self.runtime.token_cap}, "
            f"max_tokens {self.max_tokens}, tasks {self.task_names}"
        )

    def decode(self, raw: np.ndarray) -> list[str]:
        """One request's BYTES tensor as texts, within the request byte budget (RowError names a bad row)."""
        return decode_texts(raw, self.spec.max_request_bytes)

    def encode(self, texts: list[str]) -> Batch:
        return self.text.encode(texts)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        return self.runtime.run(batch)

    def predict(self, texts: list[str], batch_size: int = 256) -> Scores:
        """Probabilities per task and truncation flags for any number of texts, in input order."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.task_names}
        flags = []
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size])
            for name, probs in self.run(batch).items():
                parts[name].append(probs)
            flags.append(batch.truncated)
        if not texts:
            return Scores(
                {name: np.zeros((0, len(t.labels)), np.float32) for name, t in zip(self.task_names, self.spec.tasks)},
                np.zeros(0, bool),
            )
        return Scores({name: np.concatenate(chunks) for name, chunks in parts.items()}, np.concatenate(flags))


def row_slices(counts: list[int]) -> list[slice]:
    """Rows of each request inside the flattened batch, in request order."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices
