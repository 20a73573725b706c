"""Labels against the fp32 CPU reference of the real weights: in process (ServedModel) and through the server.

The reference texts are the validation split; the carried embedding rows cover exactly their tokens (and the
smoke texts'). The benchmark's texts may hold other tokens, whose rows are zero there: it measures speed, and
its label agreement compares fp16 with fp32 of those same weights, not with the real model.
"""

from __future__ import annotations

from pathlib import Path

from ..bench.workloads import read_texts
from ..paths import DATA
from ..served import open_served

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")


def reference_texts() -> list[str]:
    """The unique validation texts, in file order."""
    return list(dict.fromkeys(read_texts(DATA / "validation.csv")))


def smoke_texts() -> list[str]:
    """What the load tool sends first to every server (perf.load.Target.check)."""
    from ..perf.load import SMOKE_TEXTS

    return list(SMOKE_TEXTS)


def token_ids(served, texts: list[str]) -> set[int]:
    """Every token id the served tokenization gives `texts`, and the tokenizer's special tokens."""
    ids: set[int] = set()
    for start in range(0, len(texts), 256):
        ids.update(served.encode(texts[start : start + 256]).ids.reshape(-1).tolist())
    tokenizer = served.text.tokenizer
    ids.update(i for i in (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None)
    return ids


def reference(version_dir: Path, texts: list[str]) -> dict:
    import torch

    served = open_served(version_dir, runtime="torch", device="cpu", precision="float32")
    probabilities = served.predict(texts, batch_size=64).probabilities
    return {
        "texts": texts,
        "tasks": {t.name: list(t.labels) for t in served.spec.tasks},
        "probabilities": {
            name: [[round(float(x), 6) for x in row] for row in values] for name, values in probabilities.items()
        },
        "computed_with": {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "runtime": "torch"},
    }


def agreement(reference: dict, probs: dict) -> dict:
    """Per task and for rows whose every label matches: the share equal to the reference, and the largest
    probability difference."""
    import numpy as np

    result, joint = {}, None
    for task in reference["tasks"]:
        ref = np.asarray(reference["probabilities"][task])
        got = np.asarray(probs[task])
        same = ref.argmax(axis=1) == got.argmax(axis=1)
        joint = same if joint is None else joint & same
        result[task] = {
            "label_agreement": round(float(same.mean()), 5),
            "differing_rows": int((~same).sum()),
            "max_abs_prob_diff": round(float(np.abs(ref - got).max()), 6),
        }
    result["all_tasks"] = {
        "rows": len(joint),
        "label_agreement": round(float(joint.mean()), 5),
        "differing_rows": int((~joint).sum()),
    }
    return result


def parity_in_process(version_dir: Path, reference: dict, device_name: str) -> dict:
    """ServedModel (torch runtime) on the device: the served precision (fp16 on a GPU) and float32."""
    out = {}
    for precision in ("auto", "float32") if device_name == "cuda" else ("float32",):
        served = open_served(
            version_dir, runtime="torch", device="gpu" if device_name == "cuda" else "cpu", precision=precision
        )
        dtype = str(served.runtime.dtype).removeprefix("torch.")
        out[dtype] = agreement(reference, served.predict(reference["texts"], batch_size=256).probabilities)
        del served
    return out


def parity_served(target, reference: dict) -> dict:
    """Every reference text through the server (64 per request), against the reference."""
    import numpy as np

    texts = reference["texts"]
    probs: dict[str, list] = {task: [] for task in reference["tasks"]}
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        outputs = target.infer(batch)
        for task, labels in reference["tasks"].items():
            probs[task].append(np.asarray(outputs[task], dtype=np.float32).reshape(len(batch), len(labels)))
    return {"model": target.model, **agreement(reference, {task: np.concatenate(p) for task, p in probs.items()})}


def check_coverage(version_dir: Path, texts: list[str], carried_ids: set[int]) -> None:
    """Every token of the reference texts has its real embedding row (the others were not carried)."""
    served = open_served(version_dir, runtime="torch", device="cpu", precision="float32")
    missing = token_ids(served, texts) - carried_ids
    if missing:
        raise SystemExit(
            f"device: {len(missing)} token ids of the reference texts have no carried embedding row "
            f"(e.g. {sorted(missing)[:5]}): prepare the carry again from this checkout's data/"
        )
