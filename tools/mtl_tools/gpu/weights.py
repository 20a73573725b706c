"""The carried weights: fp16, with the word-embedding matrix cut to the rows of the tokens the check sends.

90 MB of fp32 weights do not fit the device call beside the server, and fp16 plus xz is still 41 MB. The GPU
serves fp16 anyway, so the carry holds fp16 weights (bit-identical to what the torch runtime's
`.to(float16)` makes of the fp32 file), and the full-size matrix is rebuilt there with zero rows elsewhere.
The file's bytes travel split into even and odd positions (the fp16 high and low bytes): xz then finds the
exponents' regularity, 1.2 MB less than the plain file.
"""

from __future__ import annotations

EMBEDDING = "encoder.embeddings.word_embeddings.weight"


def prune_embedding(state: dict, ids: set[int]) -> dict:
    """fp16 copies of every tensor, the word embedding reduced to the rows of `ids` (+ their ids)."""
    import torch

    rows = torch.tensor(sorted(ids), dtype=torch.int64)
    packed = {key: value.to(torch.float16).contiguous() for key, value in state.items() if key != EMBEDDING}
    packed[f"{EMBEDDING}.ids"] = rows
    packed[f"{EMBEDDING}.rows"] = state[EMBEDDING][rows].to(torch.float16).contiguous()
    return packed


def restore_embedding(packed: dict, vocab_size: int) -> tuple[dict, set[int]]:
    """The full-size state dict (fp16; rows not carried are zero) and the ids of the rows that are real."""
    import torch

    state = dict(packed)
    ids, rows = state.pop(f"{EMBEDDING}.ids"), state.pop(f"{EMBEDDING}.rows")
    embedding = torch.zeros((vocab_size, rows.shape[1]), dtype=rows.dtype)
    embedding[ids] = rows
    state[EMBEDDING] = embedding
    return state, set(ids.tolist())


def split_bytes(data: bytes) -> bytes:
    """Every even byte, then every odd one (then the last byte of an odd length): reversed by join_bytes."""
    return data[0::2] + data[1::2]


def join_bytes(data: bytes) -> bytes:
    half = (len(data) + 1) // 2
    out = bytearray(len(data))
    out[0::2], out[1::2] = data[:half], data[half:]
    return bytes(out)
