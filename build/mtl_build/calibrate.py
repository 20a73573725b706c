"""One temperature per task, fitted on the validation split and folded into the head's weights.

Dividing a head's weight and bias by T divides its logits by T, so every runtime serves the calibrated
probabilities with no extra step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

T_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T) on the labelled rows."""
    labelled = labels >= 0
    if labelled.sum() < 2:
        return 1.0
    x = torch.from_numpy(logits[labelled]).double()
    y = torch.from_numpy(labels[labelled])
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # optimise log T: T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), *T_RANGE))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fold_into_head(head: torch.nn.Linear, temperature: float) -> None:
    with torch.no_grad():
        head.weight.div_(temperature)
        head.bias.div_(temperature)
