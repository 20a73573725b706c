"""What the served model computes, in plain torch + tokenizers, testable without Triton.

The encoder is BERT (all-MiniLM-L6-v2) written out in torch with the same parameter names as
transformers' BertModel, so the build exports its state dict as is. A traced TorchScript graph was
rejected: tracing on the CPU bakes `device="cpu"` constants into the graph, so it cannot move to a GPU.

The dense layers (about 90% of the work at sentence lengths) run on the real tokens only, packed into
one [tokens, hidden] matrix; only attention sees the padded [rows, width] layout. So the cost of a
batch follows its real tokens, however unevenly the rows it merges are sized.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


def bucket_tokens(count: int) -> int:
    """A packed token count rounded up: to a multiple of 8 up to 256 tokens, of 64 above (about 60 sizes).

    oneDNN keeps compiled kernels for every matmul shape it meets (about 0.6 MB each in bfloat16), so
    free-form counts grew one instance by ~800 MB under load; finer steps for short inputs keep a single
    sentence from computing many filler tokens.
    """
    step = 8 if count <= 256 else 64
    return -(-count // step) * step


class Layout(NamedTuple):
    """Where the packed tokens sit in the padded [rows, width] layout of one forward."""

    slots: torch.Tensor  # [tokens] index of each real token in the flattened [rows * width] grid
    gather: torch.Tensor  # [bucket_tokens(tokens)] slots, then repeats of slot 0 as filler
    rows: int
    width: int
    bias: torch.Tensor | None  # [rows, 1, 1, width] additive attention bias (lowest value on padding); None: no padding

    @classmethod
    def from_mask(cls, mask: torch.Tensor, dtype: torch.dtype) -> "Layout":
        rows, width = mask.shape
        slots = mask.reshape(-1).nonzero().squeeze(1)
        filler = bucket_tokens(len(slots)) - len(slots)
        gather = torch.cat([slots, slots[:1].expand(filler)]) if filler and len(slots) else slots
        if len(slots) == rows * width:  # one row, or rows of equal length: nothing to mask
            return cls(slots, gather, rows, width, None)
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
        return cls(slots, gather, rows, width, bias[:, None, None, :])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens (+ filler), features] -> [rows, width, features], zeros on padding; filler is dropped."""
        if self.bias is None:  # the real tokens are the whole grid, in order
            return packed[: len(self.slots)].view(self.rows, self.width, -1)
        grid = packed.new_zeros(self.rows * self.width, packed.shape[-1])
        grid[self.slots] = packed[: len(self.slots)]
        return grid.view(self.rows, self.width, -1)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, width, features] -> [tokens (+ filler), features]."""
        return grid.reshape(self.rows * self.width, -1)[self.gather]


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        hidden = x.shape[-1]

        def split(t: torch.Tensor) -> torch.Tensor:  # packed -> [rows, heads, width, head_dim]
            return layout.unpack(t).view(layout.rows, layout.width, self.heads, hidden // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=layout.bias)
        return layout.pack(out.transpose(1, 2))


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

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, layout), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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
        """ids, mask: [rows, width] with padding on the right. On a GPU, finding the real tokens syncs once."""
        layout = Layout.from_mask(mask, self.embeddings.LayerNorm.weight.dtype)
        x = self.embeddings(ids.reshape(-1)[layout.gather], layout.gather % layout.width)
        for layer in self.encoder.layer:
            x = layer(x, layout)
        pooled = layout.unpack(x).sum(1) / mask.sum(1, keepdim=True).to(x.dtype).clamp(min=1)
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
    precision: str = "auto"  # auto | float32 (see pick_dtype)

    @classmethod
    def from_model_config(cls, model_config: dict) -> "ServingSpec":
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        try:
            tasks = tuple(TaskSpec(t["name"], tuple(t["labels"])) for t in json.loads(params["tasks"]))
            return cls(tasks, int(params["max_tokens"]), params.get("normalize", "true") == "true",
                       params.get("device", "auto"), params.get("precision", "auto"))
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


def cpu_has_fast_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AMX or AVX512-BF16: oneDNN runs bfloat16 matmuls about twice as fast as float32 there (and slower without)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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


def threads_per_instance(model_config: dict, available: int) -> int:
    """Torch threads for one CPU instance: each instance is its own process, so they split the cores between
    them. Two instances of 2 threads each on 2 cores fell to 3 requests/s in the sweep (spinning OpenMP threads)."""
    instances = sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])) or 1
    return max(1, available // instances)


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


def forward_token_budget(device: torch.device) -> int:
    """Padded tokens per forward: about 1k keeps a CPU's working set in cache (measured, docs/benchmarks.md);
    a GPU takes a whole dynamic batch (256 rows x 256 tokens) in one forward."""
    return 65536 if device.type == "cuda" else 1024


def plan_chunks(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Row indices per forward: longest first, each chunk at most `token_budget` padded tokens (one row at least)."""
    # Sorted, so each chunk pads only to its own longest row (as SentenceTransformer.encode does).
    order = np.argsort(-lengths, kind="stable")
    chunks, start = [], 0
    while start < len(order):
        count = max(1, token_budget // max(int(lengths[order[start]]), 1))
        chunks.append(order[start : start + count])
        start += count
    return chunks


@torch.inference_mode()
def predict_probabilities(
    model: MultiTaskModel, batch: Batch, device: torch.device, token_budget: int | None = None
) -> dict[str, np.ndarray]:
    """Forward the batch in chunks of similar-length rows; fp32 numpy probabilities per task, in row order."""
    lengths = batch.mask.sum(axis=1)
    out = {name: np.empty((len(lengths), head.out_features), dtype=np.float32) for name, head in model.heads.items()}
    for rows in plan_chunks(lengths, token_budget or forward_token_budget(device)):
        width = int(lengths[rows[0]])
        ids_t = torch.from_numpy(batch.ids[rows, :width]).to(device, non_blocking=True)
        mask_t = torch.from_numpy(batch.mask[rows, :width]).to(device, non_blocking=True)
        for name, probs in model(ids_t, mask_t).items():
            out[name][rows] = probs.cpu().numpy()
    return out
