"""What the served model computes, in plain torch + tokenizers, testable without Triton.

The encoder is BERT (all-MiniLM-L6-v2) written out in torch with the same parameter names as
transformers' BertModel, so the build exports its state dict as is. A traced TorchScript graph was
rejected: tracing on the CPU bakes `device="cpu"` constants into the graph, so it cannot move to a GPU.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_CONFIG_FILE = "encoder_config.json"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "TEXT"
TRUNCATED_NAME = "TRUNCATED"
# A token covers at least one character, and real text averages under 10 per token, so cutting a
# huge string to this many characters per budgeted token keeps every token the budget can hold.
CHARS_PER_TOKEN_BUDGET = 64


# ---------------------------------------------------------------------------------------------------
# Encoder


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=bias)
        return out.transpose(1, 2).reshape(batch, seq, hidden)


class _DenseNorm(nn.Module):
    """Dense, residual add, LayerNorm: BERT's `*.output` block."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, ffn)
        self.output = _DenseNorm(ffn, hidden, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, bias), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # Single-segment input: every token type is 0.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(
            _Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["layer_norm_eps"])
            for _ in range(cfg["num_hidden_layers"])
        )


class MiniLMEncoder(nn.Module):
    """BERT encoder + masked mean pooling (+ L2 norm): one sentence embedding per row."""

    def __init__(self, cfg: dict, normalize: bool = True):
        super().__init__()
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ValueError(f"unsupported encoder: model_type={cfg.get('model_type')!r} hidden_act={cfg.get('hidden_act')!r}")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.normalize = normalize

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        # Additive attention bias: padding keys get the dtype's lowest value, never attended to.
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class MultiTaskModel(nn.Module):
    """Shared encoder, one linear head per task; returns each task's probabilities (fp32)."""

    def __init__(self, encoder_cfg: dict, tasks: list["TaskSpec"], normalize: bool = True):
        super().__init__()
        self.encoder = MiniLMEncoder(encoder_cfg, normalize)
        self.heads = nn.ModuleDict({t.name: nn.Linear(encoder_cfg["hidden_size"], len(t.labels)) for t in tasks})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.encoder(ids, mask)
        return {name: torch.softmax(head(embedding).float(), dim=-1) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------------
# Serving metadata: the build writes it into config.pbtxt parameters; model.py and clients read it back.


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ServingSpec:
    tasks: tuple[TaskSpec, ...]
    max_tokens: int
    normalize: bool
    device: str  # auto | cpu | gpu

    @classmethod
    def from_model_config(cls, model_config: dict) -> "ServingSpec":
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        try:
            tasks = tuple(TaskSpec(t["name"], tuple(t["labels"])) for t in json.loads(params["tasks"]))
            return cls(tasks, int(params["max_tokens"]), params.get("normalize", "true") == "true", params.get("device", "auto"))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"model config parameters are incomplete or malformed ({exc!r}); rebuild with mtl-build") from exc


# ---------------------------------------------------------------------------------------------------
# Loading artifacts


class ArtifactError(RuntimeError):
    """The exported model files are missing or do not match the build's manifest."""


def verify_artifacts(folder: Path) -> dict:
    """Check every exported file against the SHA-256 the build recorded; return the manifest."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: run mtl-build to export the model")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: run mtl-build again")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ArtifactError(f"{path} has SHA-256 {digest}, the build recorded {expected}: the artifact is corrupt or was replaced")
    return manifest


def load_model(folder: Path, spec: ServingSpec, device: torch.device, dtype: torch.dtype) -> MultiTaskModel:
    encoder_cfg = json.loads((folder / ENCODER_CONFIG_FILE).read_text())
    model = MultiTaskModel(encoder_cfg, list(spec.tasks), spec.normalize)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_tokens)
    # Pad to the longest row of each batch, not to a fixed length.
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    return tokenizer


def pick_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    if setting == "gpu":
        raise RuntimeError("serving.device is 'gpu' but torch sees no CUDA device")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Requests in, responses out


class RowError(ValueError):
    """One row of one request is unusable; the message names the row and the problem."""


def decode_texts(raw: np.ndarray) -> list[str]:
    """BYTES tensor of shape [N, 1] (or [N]) → N strings, or RowError naming the first bad row."""
    rows = raw.reshape(-1)
    if rows.size == 0:
        raise RowError("the request holds no rows")
    texts = []
    for index, value in enumerate(rows):
        if isinstance(value, str):
            text = value
        else:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RowError(f"row {index}: invalid UTF-8 at byte {exc.start}") from None
        if not text.strip():
            raise RowError(f"row {index}: empty text")
        texts.append(text)
    return texts


@dataclass
class Batch:
    ids: np.ndarray  # int64 [rows, longest]
    mask: np.ndarray  # int64 [rows, longest]
    truncated: np.ndarray  # bool [rows]


def tokenize(tokenizer: Tokenizer, texts: list[str], max_tokens: int) -> Batch:
    char_budget = max_tokens * CHARS_PER_TOKEN_BUDGET
    clipped = [text[:char_budget] for text in texts]
    encodings = tokenizer.encode_batch(clipped)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    truncated = np.array(
        [bool(e.overflowing) or len(original) > char_budget for e, original in zip(encodings, texts)], dtype=bool
    )
    return Batch(ids, mask, truncated)


def row_slices(counts: list[int]) -> list[slice]:
    """Rows of each request inside the flattened batch, in request order."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices


@torch.inference_mode()
def predict_probabilities(
    model: MultiTaskModel, batch: Batch, device: torch.device, chunk_rows: int = 256
) -> dict[str, np.ndarray]:
    """Forward the batch in chunks of similar-length rows; fp32 numpy probabilities per task, in row order."""
    lengths = batch.mask.sum(axis=1)
    # Longest first, so each chunk is padded only to its own longest row (as SentenceTransformer.encode does).
    order = np.argsort(-lengths, kind="stable")
    out = {name: np.empty((len(lengths), head.out_features), dtype=np.float32) for name, head in model.heads.items()}
    for start in range(0, len(order), chunk_rows):
        rows = order[start : start + chunk_rows]
        width = int(lengths[rows[0]])
        ids_t = torch.from_numpy(batch.ids[rows, :width]).to(device, non_blocking=True)
        mask_t = torch.from_numpy(batch.mask[rows, :width]).to(device, non_blocking=True)
        for name, probs in model(ids_t, mask_t).items():
            out[name][rows] = probs.cpu().numpy()
    return out
