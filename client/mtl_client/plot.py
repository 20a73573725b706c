"""`mtl-client evaluate --plot FILE.png`: confusion matrices and reliability diagrams (the `plot` extra)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import MTLClientError


class PlotUnavailableError(MTLClientError):
    """matplotlib is not installed (it is the optional extra mtl-client[plot])."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError(
            "--plot needs matplotlib, which mtl-client installs only as an extra: pip install 'mtl-client[plot]'"
        ) from None


def write_plot(report: dict, path: str | Path) -> Path:
    """One row per task: its confusion matrix (row-normalised colours, counts written) and its reliability
    diagram (accuracy against mean confidence per bin, with the rows in each bin). Written atomically."""
    require_matplotlib()
    # The object API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [(name, result) for name, result in report["tasks"].items()]
    figure = Figure(figsize=(12, 5 * len(tasks)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(tasks), 2, squeeze=False)
    for (name, result), (matrix_axis, reliability_axis) in zip(tasks, axes, strict=True):
        _confusion(matrix_axis, name, result)
        _reliability(reliability_axis, name, result)
    figure.suptitle(f"{report.get('input', '')}: model '{report.get('model', '?')}'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _confusion(axis, name: str, result: dict) -> None:
    import numpy as np

    labels = result["labels"]
    counts = np.asarray(result["confusion_matrix"], dtype=float).reshape(len(labels), len(labels))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for true in range(len(labels)):
        for predicted in range(len(labels)):
            axis.text(
                predicted,
                true,
                f"{int(counts[true, predicted])}",
                ha="center",
                va="center",
                color="white" if shares[true, predicted] > 0.5 else "black",
            )
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted label")
    axis.set_ylabel("true label")
    axis.set_title(f"{name}: confusion matrix ({result['rows']:,} rows, accuracy {result['accuracy']:.3f})")


def _reliability(axis, name: str, result: dict) -> None:
    bins = result["reliability"]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    filled = [b for b in bins if b["rows"]]
    centers = [(b["low"] + b["high"]) / 2 for b in filled]
    axis.bar(centers, [b["accuracy"] for b in filled], width=width * 0.9, color="tab:blue", label="accuracy")
    axis.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        "o",
        color="tab:orange",
        label="bin (mean confidence, accuracy)",
    )
    axis.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for center, b in zip(centers, filled, strict=True):
        axis.text(center, min(b["accuracy"] + 0.02, 0.97), f"{b['rows']}", ha="center", fontsize=8)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence of the top label")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{name}: reliability (ECE {result['ece']:.3f}, rows per bin written)")
    axis.legend(loc="lower left", fontsize=8)
