"""Classification metrics from labels and probabilities, with numpy only (the client installs without torch).

The build scores its validation and challenge sets with these functions too, so `mtl-client evaluate`
on a user's data and the model card mean the same thing by each number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ECE_BINS = 10


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins over (0, 1]: rows, mean confidence and accuracy per bin (empty bins kept)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # A confidence of exactly 0 goes to the first bin; each bin is (low, high].
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "rows": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins (rows in bin / rows) · |accuracy − mean confidence|, over the top label's probability."""
    total = len(confidence)
    if total == 0:
        return 0.0
    return float(
        sum(
            b["rows"] / total * abs(b["accuracy"] - b["confidence"])
            for b in reliability(confidence, correct, bins)
            if b["rows"]
        )
    )


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_report(
    truth: Sequence[int], probabilities: np.ndarray, labels: Sequence[str], bins: int = ECE_BINS
) -> dict:
    """accuracy, macro-F1, macro-recall, per-class precision/recall/F1/support, confusion matrix and ECE.

    `truth` holds label indices (rows without a label left out by the caller); `probabilities` is [rows, labels].
    Macro averages run over the labels that occur in `truth` or in the predictions, as scikit-learn does.
    """
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(truth), len(labels))
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, len(labels))
    per_class, present = {}, []
    for k, label in enumerate(labels):
        tp, support, claimed = matrix[k, k], matrix[k].sum(), matrix[:, k].sum()
        precision, recall = _ratio(tp, claimed), _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": int(support),
        }
        if support or claimed:
            present.append((recall, f1))
    confidence = probabilities.max(axis=1) if len(truth) else np.zeros(0)
    correct = (predicted == truth).astype(np.float64)
    return {
        "rows": int(len(truth)),
        "accuracy": round(_ratio(correct.sum(), len(truth)), 4),
        "macro_f1": round(float(np.mean([f for _, f in present])) if present else 0.0, 4),
        "macro_recall": round(float(np.mean([r for r, _ in present])) if present else 0.0, 4),
        "ece": round(expected_calibration_error(confidence, correct, bins), 4),
        "per_class": per_class,
        # rows: true label, columns: predicted label, both in label order
        "confusion_matrix": matrix.tolist(),
        "labels": list(labels),
        "reliability": reliability(confidence, correct, bins),
    }
