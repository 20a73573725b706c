"""The int8 graph's checks: near ties, the float32 recheck margin, and the bar held on every split."""

import numpy as np

from mtl_build.evaluate import RECHECK_MARGINS, below_bar, choose_recheck_margin, split_agreement
from multitask_core.runtimes import near_ties


def probs(rows):
    return np.array(rows, dtype=np.float32)


def test_near_ties_are_rows_whose_two_best_labels_of_some_task_are_close():
    scores = {
        "topic": probs([[0.50, 0.46, 0.04], [0.90, 0.05, 0.05], [0.34, 0.33, 0.33]]),
        "sentiment": probs([[0.9, 0.1], [0.52, 0.48], [0.99, 0.01]]),
    }
    assert near_ties(scores, 0.05).tolist() == [True, True, True]
    assert near_ties(scores, 0.035).tolist() == [False, False, True]
    assert near_ties(scores, 0.0).tolist() == [False, False, False]


def test_the_bar_holds_per_split_not_only_on_the_union():
    reference = {"topic": probs([[0.9, 0.1]] * 10)}
    candidate = {"topic": reference["topic"].copy()}
    candidate["topic"][9] = [0.1, 0.9]  # one flipped label, in the second split
    result = split_agreement(candidate, reference, {"validation": slice(0, 5), "challenge": slice(5, 10)})
    assert result["label_agreement"] == {"topic": 0.9}
    assert result["splits"]["validation"]["label_agreement"] == {"topic": 1.0}
    assert result["splits"]["challenge"]["label_agreement"] == {"topic": 0.8}
    assert below_bar(result, 0.85) == ["topic 80.00% of 5 challenge rows"]


def test_the_smallest_margin_that_restores_the_labels_is_chosen():
    reference = {"topic": probs([[0.9, 0.1]] * 8 + [[0.53, 0.47], [0.58, 0.42]])}
    candidate = {"topic": reference["topic"].copy()}
    candidate["topic"][8] = [0.49, 0.51]  # int8 swapped a near tie (margin 0.02)
    candidate["topic"][9] = [0.46, 0.54]  # and a wider one (margin 0.08)
    splits = {"validation": slice(0, 10)}
    margin, result = choose_recheck_margin(candidate, reference, splits, 1.0)
    assert margin == min(m for m in RECHECK_MARGINS if m > 0.08)
    assert result["label_agreement"] == {"topic": 1.0} and result["rechecked_share"] == 0.2
    margin, _ = choose_recheck_margin(candidate, reference, splits, 0.8)  # two flips of ten: no recheck needed
    assert margin == 0.0
    candidate["topic"][0] = [0.0, 1.0]  # a confident flip: no recheck margin catches it
    margin, result = choose_recheck_margin(candidate, reference, splits, 1.0)
    assert margin is None and result["recheck_margin"] == RECHECK_MARGINS[-1]
