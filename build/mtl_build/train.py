"""Train the served module itself: its heads alone (frozen encoder) or the whole multi-task model (joint).

Training runs on multitask_core's torch module, the code that serves, with the packed layout: the dense
layers see only real tokens, so padding costs nothing here either. Speed levers, each chosen on validation
(docs/training.md): bfloat16 autocast on a CPU with fast bfloat16, frozen bottom layers whose outputs are
computed once and cached, and length-grouped batches.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from multitask_core.encoder import Layout, MultiTaskModel
from multitask_core.spec import cpu_has_fast_bfloat16
from multitask_core.text import TextEncoder

from .config import ProjectConfig, TaskConfig
from .data import LabelledData
from .progress import Progress

# Scale of zero-shot logits: cosine similarities lie in [-1, 1], too flat for a softmax.
ZERO_SHOT_SCALE = 20.0


def seed_everything(seed: int) -> None:
    # Float sums depend on how they are split across threads: the same thread count every build (the
    # served model's runtimes change this process-wide setting, so it is set again here).
    torch.set_num_threads(os.cpu_count() or 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_pretrained(config: ProjectConfig, backbone_dir: Path, encoder_cfg: dict) -> MultiTaskModel:
    """The served module with the backbone's pre-trained encoder weights and fresh heads."""
    model = MultiTaskModel(encoder_cfg, {t.name: len(t.labels) for t in config.tasks}, config.backbone.normalize)
    # The checkpoint also holds a pooler (unused: mean pooling) and position-id buffers.
    state = {
        k: v
        for k, v in load_file(str(backbone_dir / "model.safetensors")).items()
        if not k.endswith("_ids") and not k.startswith("pooler.")
    }
    model.encoder.load_state_dict(state, strict=True)
    return model


@dataclass
class Encoded:
    """Token ids of each text, unpadded; the batches are built from them."""

    ids: list[np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @classmethod
    def of(cls, text: TextEncoder, texts: list[str], chunk: int = 512) -> Encoded:
        ids, flags = [], []
        for start in range(0, len(texts), chunk):
            batch = text.encode(texts[start : start + chunk])
            ids.extend(row[: int(n)] for row, n in zip(batch.ids, batch.lengths))
            flags.append(batch.truncated)
        return cls(ids, np.array([len(r) for r in ids]), np.concatenate(flags) if flags else np.zeros(0, bool))

    def padded(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(max(self.lengths[r] for r in rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : self.lengths[r]] = self.ids[r]
            mask[i, : self.lengths[r]] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


def length_batches(lengths: np.ndarray, batch_size: int, generator: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length in random order: rows are shuffled, sorted by length within windows of 50
    batches, cut into batches, and the batches shuffled (attention pads each batch to its longest row)."""
    order = generator.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    generator.shuffle(batches)
    return batches


def autocast_dtype(setting: str) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and cpu_has_fast_bfloat16()):
        return torch.bfloat16
    return None


class FrozenPrefix:
    """The embeddings and the first `layers` encoder layers, run once per text and cached (packed, per row)."""

    def __init__(
        self, model: MultiTaskModel, encoded: Encoded, layers: int, dtype: torch.dtype | None, chunk_tokens: int = 8192
    ):
        self.layers = layers
        self.rows: list[torch.Tensor] = [torch.empty(0)] * len(encoded.ids)
        encoder = model.encoder
        was_training = encoder.training
        encoder.eval()
        order = np.argsort(-encoded.lengths, kind="stable")
        start = 0
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            while start < len(order):
                count = max(1, chunk_tokens // int(encoded.lengths[order[start]]))
                rows = order[start : start + count]
                ids, mask = encoded.padded(rows)
                layout = encoder.layout(mask, bucket=False)
                x = encoder.run_layers(encoder.embed_tokens(ids, layout), layout, 0, layers)
                for row, part in zip(rows, torch.split(x, [int(encoded.lengths[r]) for r in rows])):
                    self.rows[row] = part.clone()
                start += count
        encoder.train(was_training)

    def batch(self, rows) -> torch.Tensor:
        return torch.cat([self.rows[r] for r in rows]).float()


def _class_weights(target: torch.Tensor, classes: int) -> torch.Tensor:
    counts = torch.bincount(target[target >= 0], minlength=classes).float().clamp(min=1)
    return counts.sum() / (classes * counts)


class Trainer:
    """One training run of config.training's recipe; `history` keeps the per-epoch validation scores."""

    def __init__(
        self,
        config: ProjectConfig,
        model: MultiTaskModel,
        text: TextEncoder,
        train: LabelledData,
        validation: LabelledData | None,
        log=None,
    ):
        self.config, self.model, self.text = config, model, text
        self.settings = config.training
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.train_data, self.validation = train, validation
        self.history: list[dict] = []
        self.supervised = [t for t in config.tasks if train.labelled_count(t.name) > 0]

    # -- the loss ----------------------------------------------------------------------------------------
    def _loss(self, logits: dict[str, torch.Tensor], rows, weights: dict[str, torch.Tensor | None]) -> torch.Tensor:
        total = torch.zeros(())
        index = torch.as_tensor(np.asarray(rows))
        for task in self.supervised:
            target = torch.from_numpy(self.train_data.labels[task.name])[index]
            labelled = target >= 0
            if labelled.any():
                loss = F.cross_entropy(
                    logits[task.name][labelled].float(),
                    target[labelled],
                    weight=weights[task.name],
                    label_smoothing=self.settings.label_smoothing,
                )
                total = total + self.config.task_weight(task.name) * loss
        return total

    def _weights(self) -> dict[str, torch.Tensor | None]:
        if not self.settings.class_balanced:
            return {t.name: None for t in self.supervised}
        return {
            t.name: _class_weights(torch.from_numpy(self.train_data.labels[t.name]), len(t.labels))
            for t in self.supervised
        }

    # -- validation --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits_of(self, encoded: Encoded, chunk_tokens: int = 4096) -> dict[str, np.ndarray]:
        """float32 logits of every text, the model in eval mode."""
        self.model.eval()
        out = {
            name: np.zeros((len(encoded.ids), head.out_features), np.float32) for name, head in self.model.heads.items()
        }
        order = np.argsort(-encoded.lengths, kind="stable")
        start = 0
        while start < len(order):
            count = max(1, chunk_tokens // int(encoded.lengths[order[start]]))
            rows = order[start : start + count]
            ids, mask = encoded.padded(rows)
            for name, value in self.model.logits(self.model.encoder(ids, mask)).items():
                out[name][rows] = value.float().numpy()
            start += count
        return out

    def _score(self, encoded: Encoded) -> dict:
        logits = self.logits_of(encoded)
        scores = {}
        for task in self.supervised:
            truth = self.validation.labels[task.name]
            labelled = truth >= 0
            if labelled.any():
                predicted = logits[task.name].argmax(1)[labelled]
                scores[task.name] = float(f1_score(truth[labelled], predicted, average="macro"))
        scores["mean_macro_f1"] = float(np.mean(list(scores.values()))) if scores else 0.0
        return scores

    # -- runs ----------------------------------------------------------------------------------------------
    def run(self) -> MultiTaskModel:
        if not self.supervised:
            return self.model.eval()
        if self.settings.mode == "heads_only":
            self._train_heads()
        else:
            self._train_joint()
        return self.model.eval()

    def _train_heads(self) -> None:
        started = time.perf_counter()
        encoded = Encoded.of(self.text, self.train_data.texts)
        embeddings = torch.from_numpy(embed(self.model, encoded))
        self.log(f"embedded {len(encoded.ids)} training texts in {time.perf_counter() - started:.1f}s (encoder frozen)")
        heads = torch.nn.ModuleDict({t.name: self.model.heads[t.name] for t in self.supervised})
        optimizer = torch.optim.AdamW(
            heads.parameters(), lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay
        )
        generator = torch.Generator().manual_seed(self.settings.seed)
        weights = self._weights()
        for epoch in range(self.settings.epochs):
            order = torch.randperm(len(encoded.ids), generator=generator).numpy()
            epoch_loss = 0.0
            for start in range(0, len(order), self.settings.batch_size):
                rows = order[start : start + self.settings.batch_size]
                logits = {name: head(embeddings[rows]) for name, head in heads.items()}
                loss = self._loss(logits, rows, weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item() * len(rows)
            if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == self.settings.epochs:
                self.log(f"heads epoch {epoch + 1}/{self.settings.epochs}: loss {epoch_loss / len(order):.4f}")

    def _param_groups(self, frozen: int) -> list[dict]:
        s, encoder = self.settings, self.model.encoder
        layers = list(encoder.encoder.layer)
        groups = []
        if frozen == 0 and s.train_embeddings:
            groups.append(
                {
                    "params": list(encoder.embeddings.parameters()),
                    "lr": s.encoder_learning_rate * s.layer_lr_decay ** len(layers),
                }
            )
        for depth, layer in enumerate(layers):
            if depth >= frozen:
                groups.append(
                    {
                        "params": list(layer.parameters()),
                        "lr": s.encoder_learning_rate * s.layer_lr_decay ** (len(layers) - 1 - depth),
                    }
                )
        groups.append({"params": list(self.model.heads.parameters()), "lr": s.learning_rate})
        return groups

    def _train_joint(self) -> None:
        s, model = self.settings, self.model
        frozen = min(s.frozen_layers, len(model.encoder.encoder.layer))
        dtype = autocast_dtype(s.autocast)
        started = time.perf_counter()
        encoded = Encoded.of(self.text, self.train_data.texts)
        validation = Encoded.of(self.text, self.validation.texts) if self.validation is not None else None
        for parameter in model.encoder.embeddings.parameters():
            parameter.requires_grad_(frozen == 0 and s.train_embeddings)
        for depth, layer in enumerate(model.encoder.encoder.layer):
            for parameter in layer.parameters():
                parameter.requires_grad_(depth >= frozen)
        prefix = FrozenPrefix(model, encoded, frozen, dtype) if frozen else None
        if prefix is not None:
            self.log(
                f"cached the frozen embeddings + {frozen} layer(s) for {len(encoded.ids)} texts "
                f"in {time.perf_counter() - started:.1f}s"
            )
        groups = self._param_groups(frozen)
        # fused: one kernel over all parameters, 21 ms a step here against 97 ms for the default (foreach).
        optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay, fused=True)
        generator = np.random.default_rng(s.seed)
        steps_per_epoch = math.ceil(len(encoded.ids) / s.batch_size)
        total = steps_per_epoch * s.joint_epochs
        warmup = int(total * s.warmup_ratio)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        weights = self._weights()
        best_score, best_state, stale = -1.0, None, 0
        progress = Progress(total, "joint training", self.log)
        for epoch in range(s.joint_epochs):
            model.train()
            epoch_loss = 0.0
            for rows in length_batches(encoded.lengths, s.batch_size, generator):
                ids, mask = encoded.padded(rows)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    layout = Layout(mask, torch.float32, bucket=False)
                    x = prefix.batch(rows) if prefix is not None else model.encoder.embed_tokens(ids, layout)
                    x = model.encoder.run_layers(x, layout, frozen)
                    logits = model.logits(model.encoder.pool(x, layout))
                loss = self._loss(logits, rows, weights)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.item() * len(rows)
                progress.step(f"epoch {epoch + 1}/{s.joint_epochs}, loss {loss.item():.3f}")
            entry = {"epoch": epoch + 1, "loss": round(epoch_loss / len(encoded.ids), 4)}
            if validation is not None:
                entry["validation"] = {k: round(v, 4) for k, v in self._score(validation).items()}
            self.history.append(entry)
            self.log(f"joint epoch {epoch + 1}: {entry}")
            if validation is None or not s.early_stopping:
                continue
            score = entry["validation"]["mean_macro_f1"]
            if score > best_score:
                best_score, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale > s.patience:
                    self.log(f"early stopping: no gain for {stale} epoch(s); keeping epoch {epoch + 1 - stale}")
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        progress.close()


@torch.inference_mode()
def embed(model: MultiTaskModel, encoded: Encoded, chunk_tokens: int = 4096) -> np.ndarray:
    """float32 sentence embeddings, the encoder in eval mode."""
    model.eval()
    out = np.zeros((len(encoded.ids), model.encoder.embeddings.word_embeddings.embedding_dim), np.float32)
    order = np.argsort(-encoded.lengths, kind="stable")
    start = 0
    while start < len(order):
        count = max(1, chunk_tokens // int(encoded.lengths[order[start]]))
        rows = order[start : start + count]
        ids, mask = encoded.padded(rows)
        out[rows] = model.encoder(ids, mask).float().numpy()
        start += count
    return out


def init_zero_shot_head(model: MultiTaskModel, task: TaskConfig, text: TextEncoder) -> None:
    """A head whose logits are scaled cosine similarities to each label's description."""
    # "label: description" matched labelled sentences better than either part alone in a small trial.
    prompts = [f"{label}: {task.descriptions[label]}" if label in task.descriptions else label for label in task.labels]
    label_embeddings = F.normalize(torch.from_numpy(embed(model, Encoded.of(text, prompts))), dim=-1)
    with torch.no_grad():
        model.heads[task.name].weight.copy_(label_embeddings * ZERO_SHOT_SCALE)
        model.heads[task.name].bias.zero_()


def train(
    config: ProjectConfig,
    backbone_dir: Path,
    encoder_cfg: dict,
    text: TextEncoder,
    train_data: LabelledData,
    validation: LabelledData | None = None,
    log=None,
) -> tuple[MultiTaskModel, list[dict]]:
    """The trained module and the per-epoch history (joint mode)."""
    seed_everything(config.training.seed)
    model = load_pretrained(config, backbone_dir, encoder_cfg)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    for task in config.tasks:
        if train_data.labelled_count(task.name) == 0:
            log(f"task {task.name!r}: no labelled rows, zero-shot head from label descriptions")
            init_zero_shot_head(model, task, text)
    trainer = Trainer(config, model, text, train_data, validation, log)
    return trainer.run(), trainer.history
