"""How far each contender's answers are from the float32 reference: embedding cosine for the peers (against
sentence-transformers float32), label agreement for the product (against the served model's torch float32)."""

from __future__ import annotations

import numpy as np


def cosine(embeddings: np.ndarray, reference: np.ndarray) -> dict:
    """Mean and minimum cosine similarity, row by row."""
    a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(min=1e-12)
    similarity = (a * b).sum(axis=1)
    return {
        "rows": len(similarity),
        "mean_cosine": round(float(similarity.mean()), 5),
        "min_cosine": round(float(similarity.min()), 5),
    }


def label_agreement(labels: dict[str, list[str]], reference: dict[str, list[str]]) -> dict:
    """Per task, and for rows whose every label matches: the share equal to the reference."""
    result, joint = {}, None
    for task, expected in reference.items():
        same = np.array(labels[task]) == np.array(expected)
        joint = same if joint is None else joint & same
        result[task] = round(float(same.mean()), 5)
    result["all_tasks"] = round(float(joint.mean()), 5) if joint is not None else None
    result["rows"] = len(joint) if joint is not None else 0
    return result
