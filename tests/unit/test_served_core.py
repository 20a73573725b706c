"""The served computation (multitask_core) without Triton: encoder, pooling, heads, request handling."""

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from mtl_build.backbone import default_backbone_path
from multitask_core import files, runtimes, spec, text
from multitask_core.encoder import Layout, MiniLMEncoder, MultiTaskModel, bucket_tokens
from multitask_core.served import row_slices

SMALL = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    model_type="bert",
    pad_token_id=0,
)
TASKS = {"topic": 3, "mood": 2}


@pytest.fixture(scope="module")
def small_pair():
    """A random transformers BertModel and the served module holding the same weights."""
    torch.manual_seed(0)
    reference = BertModel(
        BertConfig(**{k: v for k, v in SMALL.items() if k != "model_type"}), add_pooling_layer=False
    ).eval()
    served = MultiTaskModel(SMALL, TASKS).eval()
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
        MiniLMEncoder({**SMALL, "hidden_act": "relu"})


def test_decode_texts_reports_the_bad_row():
    ok = np.array([[b"hello"], ["caf\u00e9".encode()]], dtype=object)
    assert text.decode_texts(ok) == ["hello", "caf\u00e9"]
    with pytest.raises(text.RowError, match=r"^row 1: empty text"):
        text.decode_texts(np.array([[b"fine"], [b"  \t"]], dtype=object))
    with pytest.raises(text.RowError, match=r"^row 2: invalid UTF-8 at byte 1$"):
        text.decode_texts(np.array([[b"a"], [b"b"], [b"x\xff"]], dtype=object))
    with pytest.raises(ValueError, match="no rows"):
        text.decode_texts(np.empty((0, 1), dtype=object))


@pytest.mark.parametrize("content_free", ["\x00", "\u200b", "\ufeff", " \u2028\t", "\u200d\u0301", "\x00\x01 \u00a0"])
def test_text_with_no_visible_character_is_an_empty_row(content_free):
    with pytest.raises(text.RowError, match=r"^row 1: empty text"):
        text.decode_texts(np.array([[b"fine"], [content_free.encode()]], dtype=object))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("lol 😂😂😂 this is 🔥", "lol face with tears of joy this is fire"),
        ("@jess_k92 soooooo gooood!!!!!!", "@user soo good!!!"),
        ("see http://t.co/Ab3xYz9, or www.bbc.co.uk/news.", "see http, or http."),
        ("#NotMyPresident and #GoT and #iPhone15", "#not my president and #GoT and #iPhone15"),
        ("AT&amp;T \u200bprices\x00  rise\n", "AT&T prices rise"),
        ("café ümlaut €5", "café ümlaut €5"),
    ],
)
def test_normalisation_maps_social_noise_to_words_the_encoder_knows(raw, expected):
    assert text.normalize_text(raw) == expected


def test_row_slices_split_a_flat_batch_back_per_request():
    slices = row_slices([3, 1, 4])
    flat = np.arange(8)
    assert [flat[s].tolist() for s in slices] == [[0, 1, 2], [3], [4, 5, 6, 7]]
    assert row_slices([]) == []


@pytest.fixture(scope="module")
def encoder16():
    """The one tokenization object, holding a token limit of 16."""
    return text.TextEncoder(default_backbone_path() / files.TOKENIZER_FILE, max_tokens=16)


def test_encode_pads_to_longest_and_flags_truncation(encoder16):
    batch = encoder16.encode(["short one", "word " * 40, "three words here"])
    assert batch.ids.shape == (3, 16)  # the long row hits the limit; nothing pads beyond it
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.mask[0].sum() == 4  # [CLS] short one [SEP]
    assert encoder16.encode(["short one", "hi"]).ids.shape == (2, 4)


def test_huge_text_is_cut_before_tokenizing_and_flagged(encoder16):
    huge = "finance " * 2_000_000  # 16 MB
    batch = encoder16.encode([huge])
    expected = encoder16.encode(["finance " * 20])
    assert batch.truncated.tolist() == [True]
    assert batch.ids.tolist() == expected.ids.tolist()


def test_leading_whitespace_cannot_push_the_content_past_the_character_clip(encoder16):
    padded = encoder16.encode([" " * (encoder16.max_chars + 10) + "The bank raised rates"])
    assert padded.ids.tolist() == encoder16.encode(["The bank raised rates"]).ids.tolist()
    assert padded.truncated.tolist() == [False]


class _Recorder(runtimes.Runtime):
    """A runtime that scores each row by its length, recording the chunk shapes it was given."""

    def __init__(self, token_cap):
        super().__init__({"size": 1}, token_cap)
        self.shapes = []

    def _forward(self, ids, mask):
        self.shapes.append(ids.shape)
        return {"size": mask.sum(1, keepdims=True).astype(np.float32)}


def test_runtimes_chunk_rows_by_the_token_cap_and_restore_row_order():
    lengths = np.array([3, 9, 5, 9, 2, 7])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    batch = text.Batch(mask * 7, mask, np.zeros(6, dtype=bool))
    runtime = _Recorder(token_cap=18)
    out = runtime.run(batch)
    assert out["size"][:, 0].tolist() == lengths.tolist()
    assert all(rows * width <= 18 for rows, width in runtime.shapes)
    assert sum(rows for rows, _ in runtime.shapes) == 6


def test_serving_spec_reads_triton_parameters():
    config = {
        "parameters": {
            "tasks": {"string_value": json.dumps([{"name": "topic", "labels": ["a", "b"]}])},
            "max_tokens": {"string_value": "128"},
            "runtime": {"string_value": "openvino"},
        },
        "instance_group": [{"kind": "KIND_CPU", "count": 3}],
    }
    read = spec.ServingSpec.from_model_config(config)
    assert read.tasks == (spec.TaskSpec("topic", ("a", "b")),) and read.max_tokens == 128 and read.normalize
    assert read.runtime == "openvino" and read.instance_count == 3
    with pytest.raises(ValueError, match="rebuild with mtl-build"):
        spec.ServingSpec.from_model_config({"parameters": {"tasks": {"string_value": "[oops"}}})
    bad = json.loads(json.dumps(config))
    bad["parameters"]["runtime"]["string_value"] = "tensorflow"
    with pytest.raises(ValueError, match="runtime is 'tensorflow'"):
        spec.ServingSpec.from_model_config(bad)


def test_verify_artifacts_catches_a_changed_file(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / files.MANIFEST_FILE).write_text(json.dumps({"sha256": {"weights.safetensors": digest}}))
    assert files.verify_artifacts(tmp_path)["sha256"]["weights.safetensors"] == digest
    (tmp_path / "weights.safetensors").write_bytes(b"abd")
    with pytest.raises(files.ArtifactError, match="corrupt or was replaced"):
        files.verify_artifacts(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(files.ArtifactError, match="missing"):
        files.verify_artifacts(tmp_path)


def test_plan_chunks_covers_every_row_once_within_the_budget():
    lengths = np.random.default_rng(1).integers(3, 90, 300)
    chunks = runtimes.plan_chunks(lengths, token_cap=400)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(300))
    widths = [int(lengths[rows].max()) for rows in chunks]
    assert widths == sorted(widths, reverse=True)  # longest first: each chunk pads only to its own longest row
    assert all(int(lengths[rows[0]]) == w for rows, w in zip(chunks, widths))
    assert all(w * len(rows) <= 400 for rows, w in zip(chunks, widths))
    # A row longer than the budget still gets a forward of its own.
    assert [len(c) for c in runtimes.plan_chunks(np.array([500, 5]), token_cap=100)] == [1, 1]


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
        alone = torch.cat(
            [
                served.encoder(torch.from_numpy(ids[r : r + 1, :n]), torch.from_numpy(mask[r : r + 1, :n]))
                for r, n in enumerate(lengths)
            ]
        )
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse avx512f amx_bf16 amx_tile", True),
        ("fpu sse avx512f avx512_bf16", True),
        ("fpu sse avx2 avx512f", False),
    ],
)
def test_bfloat16_only_where_the_cpu_runs_it_fast(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert spec.cpu_has_fast_bfloat16(cpuinfo) is expected
    assert spec.cpu_has_fast_bfloat16(tmp_path / "missing") is False


def test_pick_dtype_follows_precision_and_device():
    assert spec.pick_dtype(torch.device("cpu"), "float32") == torch.float32
    assert spec.pick_dtype(torch.device("cuda"), "float32") == torch.float32
    assert spec.pick_dtype(torch.device("cuda"), "auto") == torch.float16
    cpu = torch.bfloat16 if spec.cpu_has_fast_bfloat16() else torch.float32
    assert spec.pick_dtype(torch.device("cpu"), "auto") == cpu
    with pytest.raises(ValueError, match="'auto' or 'float32'"):
        spec.pick_dtype(torch.device("cpu"), "int8")


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


@pytest.mark.parametrize("instances, available, expected", [(1, 16, 16), (2, 2, 1), (4, 16, 4), (3, 2, 1), (0, 8, 8)])
def test_cpu_instances_split_the_threads(instances, available, expected):
    assert spec.threads_per_instance(instances, available) == expected  # never below one thread


def test_packed_token_counts_come_in_few_sizes():
    """Matmul shapes are what oneDNN caches kernels for: token counts are rounded up by bucket_tokens."""
    assert [bucket_tokens(n) for n in (1, 8, 9, 21, 256, 257, 1000, 1024)] == [8, 8, 16, 24, 256, 320, 1024, 1024]
    rng = np.random.default_rng(3)
    sizes = set()
    for _ in range(300):
        lengths = rng.integers(2, 60, rng.integers(1, 40))
        mask = torch.from_numpy((np.arange(60)[None, :] < lengths[:, None]).astype(np.int64))
        layout = Layout(mask, torch.float32)
        assert len(layout.slots) == lengths.sum()
        assert len(layout.gather) == bucket_tokens(len(layout.slots))
        assert torch.equal(layout.gather[: len(layout.slots)], layout.slots)
        sizes.add(len(layout.gather))
    assert len(sizes) <= 256 // 8 + (40 * 60 - 256) // 64 + 1
