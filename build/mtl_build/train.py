"""Train the task heads (frozen encoder) or the whole multi-task model (joint fine-tuning).

Training runs on transformers' BertModel, the reference implementation; the served module in
multitask_core is checked against it after export.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

# Everything is read from a verified local folder; make any accidental hub access fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from .config import ProjectConfig, TaskConfig  # noqa: E402
from .data import LabelledData  # noqa: E402
from .serving_core import core  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Scale of zero-shot logits: cosine similarities lie in [-1, 1], too flat for a softmax.
ZERO_SHOT_SCALE = 20.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


class EagerMultiTask(nn.Module):
    """transformers BertModel + masked mean pooling + L2 norm + one linear head per task."""

    def __init__(self, backbone_dir: Path, tasks: list[TaskConfig], normalize: bool = True):
        super().__init__()
        self.bert = AutoModel.from_pretrained(str(backbone_dir), local_files_only=True, add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        self.heads = nn.ModuleDict({task.name: nn.Linear(hidden, len(task.labels)) for task in tasks})
        self.normalize = normalize

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task."""
        embedding = self.embed(ids, mask)
        return {name: head(embedding) for name, head in self.heads.items()}

    @classmethod
    def from_exported(cls, version_dir: Path, backbone_dir: Path, tasks: list[TaskConfig], normalize: bool = True):
        """The transformers reference holding an exported model's weights (for parity checks)."""
        from safetensors.torch import load_file

        model = cls(backbone_dir, tasks, normalize)
        state = load_file(str(version_dir / core.WEIGHTS_FILE))
        prefix = "encoder."
        model.bert.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        model.heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
        return model.eval()

    def served_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under the names multitask_core.MultiTaskModel loads."""
        state = {f"encoder.{key}": value for key, value in self.bert.state_dict().items()}
        state.update({f"heads.{key}": value for key, value in self.heads.state_dict().items()})
        return {key: value.detach().contiguous().clone() for key, value in state.items()}


def _batches(tokenizer, texts: list[str], max_tokens: int, batch_size: int):
    for start in range(0, len(texts), batch_size):
        batch = core.tokenize(tokenizer, texts[start : start + batch_size], max_tokens)
        yield start, torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)


@torch.inference_mode()
def embed_texts(model: EagerMultiTask, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model.embed(ids, mask) for _, ids, mask in _batches(tokenizer, texts, max_tokens, batch_size)])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def init_zero_shot_head(model: EagerMultiTask, task: TaskConfig, tokenizer, max_tokens: int) -> None:
    """A head whose logits are scaled cosine similarities to each label's description."""
    # "label: description" matched labelled sentences better than either part alone in a small trial.
    prompts = [f"{label}: {task.descriptions[label]}" if label in task.descriptions else label for label in task.labels]
    with torch.no_grad():
        label_embeddings = F.normalize(embed_texts(model, tokenizer, prompts, max_tokens), dim=-1)
        model.heads[task.name].weight.copy_(label_embeddings * ZERO_SHOT_SCALE)
        model.heads[task.name].bias.zero_()


def _task_loss(config: ProjectConfig, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted sum of per-task cross-entropies over the rows labelled for each task."""
    total = torch.zeros(())
    for name, target in targets.items():
        labelled = target >= 0
        if labelled.any():
            total = total + config.task_weight(name) * F.cross_entropy(logits[name][labelled], target[labelled])
    return total


def train(config: ProjectConfig, backbone_dir: Path, train_data: LabelledData) -> EagerMultiTask:
    seed_everything(config.training.seed)
    tokenizer = core.load_tokenizer(backbone_dir / core.TOKENIZER_FILE, config.backbone.max_tokens)
    model = EagerMultiTask(backbone_dir, config.tasks, config.backbone.normalize)
    supervised = [task.name for task in config.tasks if train_data.labelled_count(task.name) > 0]
    for task in config.tasks:
        if task.name not in supervised:
            _log(f"task {task.name!r}: no labelled rows, zero-shot head from label descriptions")
            init_zero_shot_head(model, task, tokenizer, config.backbone.max_tokens)
    if not supervised:
        return model
    targets = {name: torch.from_numpy(train_data.labels[name]) for name in supervised}
    if config.training.mode == "heads_only":
        _train_heads(config, model, tokenizer, train_data.texts, targets)
    else:
        _train_joint(config, model, tokenizer, train_data.texts, targets)
    return model.eval()


def _train_heads(config, model, tokenizer, texts, targets) -> None:
    started = time.perf_counter()
    embeddings = embed_texts(model, tokenizer, texts, config.backbone.max_tokens)
    _log(f"embedded {len(texts)} training sentences in {time.perf_counter() - started:.1f}s (encoder frozen)")
    heads = nn.ModuleDict({name: model.heads[name] for name in targets})
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.training.learning_rate, weight_decay=config.training.weight_decay)
    generator = torch.Generator().manual_seed(config.training.seed)
    for epoch in range(config.training.epochs):
        order = torch.randperm(len(texts), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(texts), config.training.batch_size):
            rows = order[start : start + config.training.batch_size]
            logits = {name: heads[name](embeddings[rows]) for name in targets}
            loss = _task_loss(config, logits, {name: target[rows] for name, target in targets.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(rows)
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == config.training.epochs:
            _log(f"heads epoch {epoch + 1}/{config.training.epochs}: loss {epoch_loss / len(texts):.4f}")


def _train_joint(config, model, tokenizer, texts, targets) -> None:
    settings = config.training
    optimizer = torch.optim.AdamW(
        [
            {"params": model.bert.parameters(), "lr": settings.encoder_learning_rate},
            {"params": model.heads.parameters(), "lr": settings.learning_rate},
        ],
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = -(-len(texts) // settings.batch_size)
    total_steps = steps_per_epoch * settings.joint_epochs
    # Linear decay keeps the last epochs from undoing the encoder's pre-training.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    for epoch in range(settings.joint_epochs):
        model.train()
        order = torch.randperm(len(texts), generator=generator).tolist()
        epoch_loss = 0.0
        for step, start in enumerate(range(0, len(texts), settings.batch_size), start=1):
            rows = order[start : start + settings.batch_size]
            batch = core.tokenize(tokenizer, [texts[i] for i in rows], config.backbone.max_tokens)
            logits = model(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask))
            index = torch.tensor(rows)
            loss = _task_loss(config, logits, {name: target[index] for name, target in targets.items()})
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(rows)
            if step % 10 == 0 or step == steps_per_epoch:
                _log(
                    f"joint epoch {epoch + 1}/{settings.joint_epochs} step {step}/{steps_per_epoch}: "
                    f"loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)"
                )
        _log(f"joint epoch {epoch + 1}: mean loss {epoch_loss / len(texts):.4f}")
    model.eval()
