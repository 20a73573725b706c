"""The temperature fit, and the head it is folded into."""

import numpy as np
import torch

from mtl_build import calibrate


def _sampled(temperature: float, rows: int = 20_000, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (rows, 3))
    probabilities = calibrate.softmax(logits, temperature)
    labels = np.array([rng.choice(3, p=p) for p in probabilities])
    return logits, labels


def test_fit_recovers_the_temperature_the_labels_were_drawn_with():
    for truth in (0.5, 1.0, 2.5):
        logits, labels = _sampled(truth)
        assert abs(calibrate.fit_temperature(logits, labels) - truth) < 0.08 * truth


def test_unlabelled_rows_are_ignored_and_too_few_rows_give_one():
    logits, labels = _sampled(2.0, rows=5_000)
    with_gaps = labels.copy()
    with_gaps[::3] = -1
    assert abs(calibrate.fit_temperature(logits, with_gaps) - 2.0) < 0.25
    assert calibrate.fit_temperature(logits[:1], labels[:1]) == 1.0


def test_calibration_lowers_the_expected_calibration_error():
    from mtl_client.metrics import expected_calibration_error

    logits, labels = _sampled(3.0)

    def ece(probabilities):
        return expected_calibration_error(probabilities.max(1), (probabilities.argmax(1) == labels).astype(float))

    before = ece(calibrate.softmax(logits))
    after = ece(calibrate.softmax(logits, calibrate.fit_temperature(logits, labels)))
    assert after < before / 3 and after < 0.02


def test_folding_the_temperature_into_the_head_divides_its_logits():
    head = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    before = head(x).detach()
    calibrate.fold_into_head(head, 2.0)
    assert torch.allclose(head(x), before / 2.0, atol=1e-6)
