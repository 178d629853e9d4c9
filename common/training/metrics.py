"""Classification metrics of a site's evaluation: loss, accuracy, macro AUROC (one-vs-rest), F1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


@dataclass(frozen=True)
class Metrics:
    """Evaluation metrics over one set of examples."""

    num_examples: int
    loss: float  # mean cross-entropy per example
    accuracy: float
    auroc: float  # macro one-vs-rest over classes with positives and negatives; nan if none
    f1: float  # macro over the classes present in labels or predictions


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the classes that have both positives and negatives."""
    scores = []
    for c in range(probs.shape[1]):
        positive = labels == c
        if positive.any() and not positive.all():
            scores.append(roc_auc_score(positive, probs[:, c]))
    return float(np.mean(scores)) if scores else math.nan


def classification_metrics(labels: np.ndarray, probs: np.ndarray, loss_sum: float) -> Metrics:
    """Metrics from integer labels (N,), class probabilities (N, C) and the summed loss."""
    n = int(labels.shape[0])
    if n == 0:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan)
    pred = probs.argmax(axis=1)
    return Metrics(
        num_examples=n,
        loss=loss_sum / n,
        accuracy=float((pred == labels).mean()),
        auroc=macro_auroc(labels, probs),
        f1=float(f1_score(labels, pred, average="macro", zero_division=0)),
    )
