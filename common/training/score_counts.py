"""Score histograms of an evaluation, and the metrics computed from them.

What a site releases of an evaluation under DP is not its metrics but counts: for each scored
class k, a histogram of the predicted probability p_k over the rows of class k and over the
others (the one-vs-rest AUROC needs both), and a confusion matrix. Every metric (loss, accuracy,
macro AUROC, F1) is computed from the counts, at the site and, pooled over sites, at the
coordinator. A binary task scores class 1 only (p_0 = 1 - p_1) and reads the prediction off the
bin (0.5 is a bin edge), so one row adds exactly one count; with C >= 3 classes a row adds one
count to each of the C histograms and one to the confusion matrix.

The bins are fixed, so the counts depend on nothing but the rows' scores and labels: 10 bins of
equal width in logit space between -6 and 6 (probabilities 0.0025 to 0.9975; 0.5 is the middle
edge). Bins of equal width in probability lose the ranking of a model whose probabilities sit in
a narrow range: a DP model on medpix-dev scored every row below 0.25, and those bins put its
exact AUROC of 0.886 at 0.667 before any noise; these bins at 0.862, and within 0.06 of the
exact AUROC on synthetic weak and confident models (`benchmarks/side_channels.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.training.metrics import Metrics

BINS = 10
LOGIT_RANGE = 6.0  # the bins cover logits -6..6; the outer bins reach on to 0 and 1
_LOGIT_EDGES = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS + 1)
EDGES = np.concatenate([[0.0], 1 / (1 + np.exp(-_LOGIT_EDGES[1:-1])), [1.0]])  # (BINS + 1,)
# a bin's probability when the loss is computed from counts: its logit middle
MIDS = 1 / (1 + np.exp(-(_LOGIT_EDGES[:-1] + _LOGIT_EDGES[1:]) / 2))
MIN_CLASS_COUNT = 0.5  # a class with fewer (noisy) positives or negatives has no AUROC


@dataclass(frozen=True)
class ScoreCounts:
    """Counts of one set of rows: score histograms per scored class and a confusion matrix."""

    scores: np.ndarray  # (K, 2, BINS): [k, 0] rows not of class k, [k, 1] rows of class k
    confusion: np.ndarray | None  # (C, C) label x prediction; None when binary (K = 1)

    @property
    def num_classes(self) -> int:
        """The task's number of classes."""
        return 2 if self.confusion is None else int(self.confusion.shape[0])

    @property
    def cells_per_row(self) -> int:
        """How many counts one row adds (the squared L2 sensitivity of the counts)."""
        return int(self.scores.shape[0]) + (0 if self.confusion is None else 1)

    def __add__(self, other: ScoreCounts) -> ScoreCounts:
        confusion = None if self.confusion is None else self.confusion + other.confusion
        return ScoreCounts(self.scores + other.scores, confusion)

    def arrays(self) -> dict[str, np.ndarray]:
        """The counts as named float32 arrays (for a reply)."""
        out = {"scores": self.scores.astype(np.float32)}
        if self.confusion is not None:
            out["confusion"] = self.confusion.astype(np.float32)
        return out

    @classmethod
    def empty(cls, num_classes: int) -> ScoreCounts:
        """No rows."""
        k = 1 if num_classes == 2 else num_classes
        return cls(
            np.zeros((k, 2, BINS)),
            None if num_classes == 2 else np.zeros((num_classes, num_classes)),
        )

    @classmethod
    def shapes(cls, num_classes: int) -> dict[str, tuple[int, ...]]:
        """The arrays' names and shapes for a task of `num_classes` classes."""
        return {name: a.shape for name, a in cls.empty(num_classes).arrays().items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ScoreCounts:
        """Inverse of `arrays` (shapes are the caller's to check: `shapes`)."""
        confusion = arrays.get("confusion")
        return cls(
            np.asarray(arrays["scores"], dtype=np.float64),
            None if confusion is None else np.asarray(confusion, dtype=np.float64),
        )


def finite_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of logits (N, C); a row with a non-finite logit scores 1/C for every class.

    Whatever model is evaluated, each row lands in exactly one bin per histogram.
    """
    logits = np.asarray(logits, dtype=np.float64)
    bad = ~np.isfinite(logits).all(axis=1)
    safe = np.where(bad[:, None], 0.0, logits)
    safe = safe - safe.max(axis=1, keepdims=True)
    probs = np.exp(safe)
    out: np.ndarray = probs / probs.sum(axis=1, keepdims=True)  # numpy infers Any here
    return out


def _bins(p: np.ndarray) -> np.ndarray:
    # bin i holds EDGES[i] <= p < EDGES[i + 1]: p = 0.5 is bin BINS // 2, a prediction of class 1
    return np.clip(np.searchsorted(EDGES, p, side="right") - 1, 0, BINS - 1)


def count_scores(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> ScoreCounts:
    """The counts of rows with class probabilities `probs` (N, C) and integer `labels` (N,)."""
    c = num_classes
    counts = ScoreCounts.empty(c)
    if len(labels) == 0:
        return counts
    labels = np.asarray(labels, dtype=np.int64)
    scored = [1] if c == 2 else list(range(c))
    for k_index, k in enumerate(scored):
        np.add.at(counts.scores[k_index], ((labels == k).astype(np.int64), _bins(probs[:, k])), 1)
    if counts.confusion is not None:
        np.add.at(counts.confusion, (labels, probs.argmax(axis=1)), 1)
    return counts


def _auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of two score histograms over the same bins (ties within a bin count one half)."""
    p, n = positives.sum(), negatives.sum()
    if p < MIN_CLASS_COUNT or n < MIN_CLASS_COUNT:
        return math.nan
    below = np.cumsum(negatives) - negatives
    return float(np.clip((positives * (below + negatives / 2)).sum() / (p * n), 0.0, 1.0))


def confusion_matrix(counts: ScoreCounts) -> np.ndarray:
    """Label x prediction (C, C); a binary task's is read off class 1's histogram."""
    if counts.confusion is not None:
        clipped: np.ndarray = np.clip(counts.confusion, 0.0, None)  # numpy infers Any here
        return clipped
    scores = np.clip(counts.scores[0], 0.0, None)
    half = BINS // 2
    return np.array(
        [
            [scores[0, :half].sum(), scores[0, half:].sum()],
            [scores[1, :half].sum(), scores[1, half:].sum()],
        ]
    )


def _macro_f1(confusion: np.ndarray) -> float:
    """Macro F1 over the classes present in the labels or the predictions (as scikit-learn)."""
    tp = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support >= MIN_CLASS_COUNT) | (predicted >= MIN_CLASS_COUNT)
    if not present.any():
        return math.nan
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean())


def _loss(counts: ScoreCounts, n: float) -> float:
    """Mean cross-entropy with every row's probability at its bin's middle."""
    scores = np.clip(counts.scores, 0.0, None)
    if counts.confusion is None:  # rows of class 1 at p_1, rows of class 0 at 1 - p_1
        total = (scores[0, 1] * -np.log(MIDS)).sum() + (scores[0, 0] * -np.log(1 - MIDS)).sum()
    else:  # every row is a positive of exactly one class's histogram
        total = (scores[:, 1, :] * -np.log(MIDS)).sum()
    return float(total / n)


def metrics_from_counts(counts: ScoreCounts, *, num_examples: int) -> Metrics:
    """Loss, accuracy, macro AUROC and F1 from counts (noisy counts are clipped at zero)."""
    if num_examples <= 0:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan)
    scores = np.clip(counts.scores, 0.0, None)
    aurocs = [_auroc(scores[k, 0], scores[k, 1]) for k in range(scores.shape[0])]
    aurocs = [a for a in aurocs if math.isfinite(a)]
    confusion = confusion_matrix(counts)
    total = confusion.sum()
    return Metrics(
        num_examples=num_examples,
        loss=_loss(counts, max(total, 1.0)),
        accuracy=float(np.trace(confusion) / total) if total >= MIN_CLASS_COUNT else math.nan,
        auroc=float(np.mean(aurocs)) if aurocs else math.nan,
        f1=_macro_f1(confusion),
    )
