"""The encoder and heads in plain torch: BERT (all-MiniLM-L6-v2) under transformers' parameter names.

The build trains this module and exports its state dict; the torch runtime serves it, and the ONNX graph
is exported from it. A traced TorchScript graph was rejected: tracing on the CPU bakes `device="cpu"`
constants into the graph, so it cannot move to a GPU.

With a packed layout the dense layers (about 90% of the work at sentence lengths) run on the real tokens
only, as one [tokens, hidden] matrix; only attention sees the padded [rows, width] grid. So the cost of a
batch follows its real tokens, however unevenly its rows are sized. The padded layout is the same
computation in fixed shapes, for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bucket_tokens(count: int) -> int:
    """A packed token count rounded up: to a multiple of 8 up to 256 tokens, of 64 above (about 60 sizes).

    oneDNN keeps compiled kernels for every matmul shape it meets (about 0.6 MB each in bfloat16), so
    free-form counts grew one instance by ~800 MB under load; finer steps for short inputs keep a single
    sentence from computing many filler tokens.
    """
    step = 8 if count <= 256 else 64
    return -(-count // step) * step


def _attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, 1, width]: 0 on real tokens, the lowest value on padding."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class Layout:
    """Where the packed tokens sit in the padded [rows, width] grid of one forward."""

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype, bucket: bool = True):
        self.rows, self.width = mask.shape
        # [tokens] index of each real token in the flattened grid, row by row
        self.slots = mask.reshape(-1).nonzero().squeeze(1)
        filler = bucket_tokens(len(self.slots)) - len(self.slots) if bucket else 0
        # the slots, then repeats of slot 0 as filler up to a bucketed count
        self.gather = (
            torch.cat([self.slots, self.slots[:1].expand(filler)]) if filler and len(self.slots) else self.slots
        )
        full = len(self.slots) == self.rows * self.width  # one row, or rows of equal length: nothing to mask
        self.bias = None if full else _attention_bias(mask, dtype)
        self.lengths = mask.sum(1, keepdim=True)

    def positions(self) -> torch.Tensor:
        return self.gather % self.width

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens (+ filler), features] -> [rows, width, features], zeros on padding; filler is dropped."""
        if self.bias is None:  # the real tokens are the whole grid, in order
            return packed[: len(self.slots)].view(self.rows, self.width, -1)
        grid = packed.new_zeros(self.rows * self.width, packed.shape[-1])
        grid = grid.index_copy(0, self.slots, packed[: len(self.slots)])
        return grid.view(self.rows, self.width, -1)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, width, features] -> [tokens (+ filler), features]."""
        return grid.reshape(self.rows * self.width, -1)[self.gather]


class PaddedLayout:
    """Every grid position as a token: fixed-shape operations only, for ONNX export."""

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype):
        self.rows, self.width = mask.shape[0], mask.shape[1]
        self.mask = mask
        self.bias = _attention_bias(mask, dtype)
        self.lengths = mask.sum(1, keepdim=True)

    def positions(self) -> torch.Tensor:
        return torch.arange(self.width, device=self.mask.device).expand(self.rows, self.width).reshape(-1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        grid = packed.view(self.rows, self.width, -1)
        return grid * self.mask.unsqueeze(-1).to(grid.dtype)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(self.rows * self.width, -1)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        hidden = x.shape[-1]

        def split(t: torch.Tensor) -> torch.Tensor:  # packed -> [rows, heads, width, head_dim]
            return layout.unpack(t).view(layout.rows, layout.width, self.heads, hidden // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)),
            split(self.key(x)),
            split(self.value(x)),
            attn_mask=layout.bias,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return layout.pack(out.transpose(1, 2))


class _DenseNorm(nn.Module):
    """Dense, dropout, residual add, LayerNorm: BERT's `*.output` block."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.dropout(self.dense(x), self.dropout, self.training) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads, dropout)
        self.output = _DenseNorm(hidden, hidden, eps, dropout)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)


class _Layer(nn.Module):
    def __init__(self, cfg: dict, dropout: float):
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attention = _Attention(hidden, cfg["num_attention_heads"], eps, dropout)
        self.intermediate = _Intermediate(hidden, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], hidden, eps, dropout)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, layout), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict, dropout: float):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])
        self.dropout = dropout

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Single-segment input: every token type is 0.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg, dropout) for _ in range(cfg["num_hidden_layers"]))


class MiniLMEncoder(nn.Module):
    """BERT encoder + masked mean pooling (+ L2 norm): one sentence embedding per row.

    Dropout (the encoder config's hidden_dropout_prob) acts in training mode only.
    """

    def __init__(self, cfg: dict, normalize: bool = True):
        super().__init__()
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ValueError(
                f"unsupported encoder: model_type={cfg.get('model_type')!r} hidden_act={cfg.get('hidden_act')!r}"
            )
        dropout = float(cfg.get("hidden_dropout_prob", 0.0))
        self.embeddings = _Embeddings(cfg, dropout)
        self.encoder = _Encoder(cfg, dropout)
        self.normalize = normalize

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.LayerNorm.weight.dtype

    def layout(self, mask: torch.Tensor, packed: bool = True, bucket: bool = True):
        return Layout(mask, self.dtype, bucket) if packed else PaddedLayout(mask, self.dtype)

    def embed_tokens(self, ids: torch.Tensor, layout) -> torch.Tensor:
        """[rows, width] ids -> [tokens, hidden] embeddings of the layout's tokens."""
        flat = ids.reshape(-1)
        return self.embeddings(flat[layout.gather] if isinstance(layout, Layout) else flat, layout.positions())

    def run_layers(self, x: torch.Tensor, layout, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for layer in self.encoder.layer[start:stop]:
            x = layer(x, layout)
        return x

    def pool(self, x: torch.Tensor, layout) -> torch.Tensor:
        pooled = layout.unpack(x).sum(1) / layout.lengths.to(x.dtype).clamp(min=1)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, packed: bool = True) -> torch.Tensor:
        """ids, mask: [rows, width] with padding on the right. On a GPU, finding the real tokens syncs once."""
        layout = self.layout(mask, packed)
        return self.pool(self.run_layers(self.embed_tokens(ids, layout), layout), layout)


class MultiTaskModel(nn.Module):
    """Shared encoder, one linear head per task."""

    def __init__(self, encoder_cfg: dict, task_sizes: dict[str, int], normalize: bool = True):
        super().__init__()
        self.encoder = MiniLMEncoder(encoder_cfg, normalize)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(encoder_cfg["hidden_size"], size) for name, size in task_sizes.items()}
        )

    def logits(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(embedding) for name, head in self.heads.items()}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, packed: bool = True) -> dict[str, torch.Tensor]:
        """Each task's probabilities (float32)."""
        embedding = self.encoder(ids, mask, packed)
        return {name: torch.softmax(logits.float(), dim=-1) for name, logits in self.logits(embedding).items()}


class ExportedGraph(nn.Module):
    """The padded forward with one output per task, as the ONNX graph holds it."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(ids, mask, packed=False).values())
