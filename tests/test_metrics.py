"""Evaluation metrics against scikit-learn's reference implementations."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from common.training.metrics import classification_metrics, macro_auroc


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet([1, 1, 1], 200)
    probs[np.arange(200), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)
    loss_sum = -np.log(probs[np.arange(200), labels]).sum()
    m = classification_metrics(labels, probs, loss_sum)
    assert m.num_examples == 200
    assert math.isclose(m.auroc, roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert math.isclose(m.loss, log_loss(labels, probs))
    assert math.isclose(m.accuracy, float((probs.argmax(1) == labels).mean()))
    assert math.isclose(m.f1, f1_score(labels, probs.argmax(1), average="macro"))


def test_auroc_skips_classes_without_both_outcomes() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0]])
    assert macro_auroc(labels, probs) == 1.0  # class 2 never occurs: left out
    assert math.isnan(macro_auroc(np.array([1, 1]), probs[:2]))
    assert math.isnan(classification_metrics(np.zeros(0, int), np.zeros((0, 3)), 0.0).auroc)
