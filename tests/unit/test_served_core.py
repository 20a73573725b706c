"""The served computation (multitask_core) without Triton: encoder, pooling, heads, request handling."""
import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from mtl_build.backbone import default_backbone_path
from mtl_build.serving_core import core

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
             model_type="bert", pad_token_id=0)
TASKS = [core.TaskSpec("topic", ("a", "b", "c")), core.TaskSpec("mood", ("x", "y"))]


@pytest.fixture(scope="module")
def small_pair():
    """A random transformers BertModel and the served module holding the same weights."""
    torch.manual_seed(0)
    reference = BertModel(BertConfig(**{k: v for k, v in SMALL.items() if k != "model_type"}), add_pooling_layer=False).eval()
    served = core.MultiTaskModel(SMALL, TASKS).eval()
    missing, unexpected = served.encoder.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids", "embeddings.token_type_ids"}
    return reference, served


def test_encoder_matches_transformers_mean_pooling(small_pair):
    reference, served = small_pair
    ids = torch.randint(1, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids = ids * mask
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        actual = served.encoder(ids, mask)
    assert actual.shape == (3, 32)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.allclose(actual.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_padding_does_not_change_a_row(small_pair):
    _, served = small_pair
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    with torch.no_grad():
        alone = served.encoder(ids, torch.ones_like(ids))
        with_padding = served.encoder(padded, (padded != 0).long())
    assert torch.allclose(alone, with_padding, atol=1e-6)


def test_heads_give_one_probability_vector_per_task(small_pair):
    _, served = small_pair
    ids = torch.randint(1, 120, (5, 6))
    with torch.no_grad():
        out = served(ids, torch.ones_like(ids))
    assert list(out) == ["topic", "mood"]
    assert out["topic"].shape == (5, 3) and out["mood"].shape == (5, 2)
    assert out["topic"].dtype == torch.float32
    assert torch.allclose(out["mood"].sum(-1), torch.ones(5), atol=1e-6)


def test_unsupported_encoder_is_refused():
    with pytest.raises(ValueError, match="unsupported encoder"):
        core.MiniLMEncoder({**SMALL, "hidden_act": "relu"})


def test_decode_texts_reports_the_bad_row():
    ok = np.array([[b"hello"], ["caf\u00e9".encode()]], dtype=object)
    assert core.decode_texts(ok) == ["hello", "caf\u00e9"]
    with pytest.raises(core.RowError, match=r"^row 1: empty text$"):
        core.decode_texts(np.array([[b"fine"], [b"  \t"]], dtype=object))
    with pytest.raises(core.RowError, match=r"^row 2: invalid UTF-8 at byte 1$"):
        core.decode_texts(np.array([[b"a"], [b"b"], [b"x\xff"]], dtype=object))
    with pytest.raises(core.RowError, match="no rows"):
        core.decode_texts(np.empty((0, 1), dtype=object))


def test_row_slices_split_a_flat_batch_back_per_request():
    slices = core.row_slices([3, 1, 4])
    flat = np.arange(8)
    assert [flat[s].tolist() for s in slices] == [[0, 1, 2], [3], [4, 5, 6, 7]]
    assert core.row_slices([]) == []


@pytest.fixture(scope="module")
def tokenizer():
    return core.load_tokenizer(default_backbone_path() / core.TOKENIZER_FILE, max_tokens=16)


def test_tokenize_pads_to_longest_and_flags_truncation(tokenizer):
    batch = core.tokenize(tokenizer, ["short one", "word " * 40, "three words here"], max_tokens=16)
    assert batch.ids.shape == (3, 16)  # the long row hits the budget; nothing pads beyond it
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.mask[0].sum() == 4  # [CLS] short one [SEP]
    short = core.tokenize(tokenizer, ["short one", "hi"], max_tokens=16)
    assert short.ids.shape == (2, 4)


def test_huge_text_is_cut_before_tokenizing_and_flagged(tokenizer):
    huge = "finance " * 2_000_000  # 16 MB
    batch = core.tokenize(tokenizer, [huge], max_tokens=16)
    expected = core.tokenize(tokenizer, ["finance " * 20], max_tokens=16)
    assert batch.truncated.tolist() == [True]
    assert batch.ids.tolist() == expected.ids.tolist()


def test_predict_probabilities_chunks_rows_without_changing_results(small_pair):
    _, served = small_pair
    ids = np.random.default_rng(0).integers(1, 120, (10, 7))
    mask = np.ones_like(ids)
    mask[3, 4:] = 0
    batch = core.Batch(ids * mask, mask, np.zeros(10, dtype=bool))
    whole = core.predict_probabilities(served, batch, torch.device("cpu"), token_budget=10_000)
    chunked = core.predict_probabilities(served, batch, torch.device("cpu"), token_budget=20)  # 2-3 rows each
    for name in whole:
        assert np.allclose(whole[name], chunked[name], atol=1e-6)


def test_serving_spec_reads_triton_parameters():
    config = {"parameters": {
        "tasks": {"string_value": json.dumps([{"name": "topic", "labels": ["a", "b"]}])},
        "max_tokens": {"string_value": "128"},
    }}
    spec = core.ServingSpec.from_model_config(config)
    assert spec.tasks == (core.TaskSpec("topic", ("a", "b")),) and spec.max_tokens == 128 and spec.normalize
    with pytest.raises(ValueError, match="rebuild with mtl-build"):
        core.ServingSpec.from_model_config({"parameters": {"tasks": {"string_value": "[oops"}}})


def test_verify_artifacts_catches_a_changed_file(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / core.MANIFEST_FILE).write_text(json.dumps({"sha256": {"weights.safetensors": digest}}))
    assert core.verify_artifacts(tmp_path)["sha256"]["weights.safetensors"] == digest
    (tmp_path / "weights.safetensors").write_bytes(b"abd")
    with pytest.raises(core.ArtifactError, match="corrupt or was replaced"):
        core.verify_artifacts(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(core.ArtifactError, match="missing"):
        core.verify_artifacts(tmp_path)


def test_plan_chunks_covers_every_row_once_within_the_budget():
    lengths = np.random.default_rng(1).integers(3, 90, 300)
    chunks = core.plan_chunks(lengths, token_budget=400)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(300))
    widths = [int(lengths[rows].max()) for rows in chunks]
    assert widths == sorted(widths, reverse=True)  # longest first: each chunk pads only to its own longest row
    assert all(int(lengths[rows[0]]) == w for rows, w in zip(chunks, widths))
    assert all(w * len(rows) <= 400 for rows, w in zip(chunks, widths))
    # A row longer than the budget still gets a forward of its own.
    assert [len(c) for c in core.plan_chunks(np.array([500, 5]), token_budget=100)] == [1, 1]


def test_packed_encoder_ignores_how_rows_are_batched(small_pair):
    """Rows of very different lengths in one forward give what each row gives alone."""
    _, served = small_pair
    rng = np.random.default_rng(2)
    lengths = [2, 60, 7, 33, 2]
    ids = np.zeros((len(lengths), 60), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, 120, n)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        together = served.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        alone = torch.cat([served.encoder(torch.from_numpy(ids[r:r + 1, :n]), torch.from_numpy(mask[r:r + 1, :n]))
                           for r, n in enumerate(lengths)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx512f amx_bf16 amx_tile", True),
    ("fpu sse avx512f avx512_bf16", True),
    ("fpu sse avx2 avx512f", False),
])
def test_bfloat16_only_where_the_cpu_runs_it_fast(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert core.cpu_has_fast_bfloat16(cpuinfo) is expected
    assert core.cpu_has_fast_bfloat16(tmp_path / "missing") is False


def test_pick_dtype_follows_precision_and_device():
    assert core.pick_dtype(torch.device("cpu"), "float32") == torch.float32
    assert core.pick_dtype(torch.device("cuda"), "float32") == torch.float32
    assert core.pick_dtype(torch.device("cuda"), "auto") == torch.float16
    cpu = torch.bfloat16 if core.cpu_has_fast_bfloat16() else torch.float32
    assert core.pick_dtype(torch.device("cpu"), "auto") == cpu
    with pytest.raises(ValueError, match="'auto' or 'float32'"):
        core.pick_dtype(torch.device("cpu"), "int8")


def test_bfloat16_encoder_stays_close_to_float32(small_pair):
    _, served = small_pair
    ids = torch.randint(1, 120, (6, 11))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    with torch.no_grad():
        full = served(ids * mask, mask)
        half = served.to(torch.bfloat16)(ids * mask, mask)
        served.to(torch.float32)
    for name in full:
        assert half[name].dtype == torch.float32  # heads hand back float32 probabilities whatever runs inside
        assert torch.allclose(full[name], half[name], atol=0.05)


@pytest.mark.parametrize("groups, available, expected", [
    ([{"kind": "KIND_CPU", "count": 1}], 16, 16),
    ([{"kind": "KIND_CPU", "count": 2}], 2, 1),
    ([{"kind": "KIND_CPU", "count": 4}], 16, 4),
    ([{"kind": "KIND_CPU", "count": 3}], 2, 1),  # never below one thread
    ([], 8, 8),
])
def test_cpu_instances_split_the_threads(groups, available, expected):
    assert core.threads_per_instance({"instance_group": groups}, available) == expected


def test_packed_token_counts_come_in_few_sizes():
    """Matmul shapes are what oneDNN caches kernels for: token counts are rounded up by bucket_tokens."""
    assert [core.bucket_tokens(n) for n in (1, 8, 9, 21, 256, 257, 1000, 1024)] == [8, 8, 16, 24, 256, 320, 1024, 1024]
    rng = np.random.default_rng(3)
    sizes = set()
    for _ in range(300):
        lengths = rng.integers(2, 60, rng.integers(1, 40))
        mask = torch.from_numpy((np.arange(60)[None, :] < lengths[:, None]).astype(np.int64))
        layout = core.Layout.from_mask(mask, torch.float32)
        assert len(layout.slots) == lengths.sum()
        assert len(layout.gather) == core.bucket_tokens(len(layout.slots))
        assert torch.equal(layout.gather[: len(layout.slots)], layout.slots)
        sizes.add(len(layout.gather))
    assert len(sizes) <= 256 // 8 + (40 * 60 - 256) // 64 + 1
