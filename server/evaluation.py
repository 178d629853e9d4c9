"""The coordinator's view of an evaluation: the sites' released score counts, checked and pooled.

A site releases noisy score counts per view of its validation rows (`common.training.ablation`:
rows lacking a modality, rows with both, and, with the last round's ablation, those rows with the
image only and the report only, and with the run's structured fields, the fields only and every
modality but the fields). The coordinator reads them as untrusted input (known views, the run's
modalities and shapes, finite and bounded values). When the sites released noisy counts, the
round's validation accuracy, AUROC and F1 are computed from their sum over the sites: metrics over
every evaluated row, not a mean of the sites' own (with noisy counts, a pooled AUROC errs about
half as much as the mean of the sites' AUROCs: measured on synthetic scores, 0.041 vs 0.076 at a
noise of 2 counts). When every site released exactly (`exact-metrics`: a researcher's simulation),
they are the means of the sites' own metrics weighted by validation records, as the sites computed
them from every score (the counts' 10 bins would blur a model whose scores crowd into one bin). The
loss is always that weighted mean: the loss over every row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from common import protocol as R
from common.training.ablation import ABLATION_VIEWS, FIELDS_VIEWS, VIEWS
from common.training.metrics import Metrics
from common.training.score_counts import ScoreCounts, metrics_from_counts

MAX_COUNT = 1e9  # a noisy count beyond this is not believed


class MalformedCounts(Exception):
    """Released counts that do not follow the protocol."""


def read_counts(
    arrays: Mapping[str, np.ndarray], num_classes: int, *, fields: bool = False
) -> dict[str, ScoreCounts]:
    """A reply's counts per view, checked: the views the run's modalities allow (`fields`: the
    run declares structured fields), the run's shapes, finite values."""
    shapes = ScoreCounts.shapes(num_classes)
    views = sorted({name.split("/", 1)[0] for name in arrays})
    ablation = {*VIEWS, *ABLATION_VIEWS, *(FIELDS_VIEWS if fields else ())}
    if set(views) not in ({*VIEWS}, ablation):
        raise MalformedCounts(
            f"views {views} are not {sorted(VIEWS)}, nor with the ablation's "
            f"{sorted(ablation - {*VIEWS})}."
        )
    expected = {f"{v}/{name}" for v in views for name in shapes}
    if set(arrays) != expected:
        raise MalformedCounts(f"count arrays {sorted(arrays)[:6]} are not {sorted(expected)[:6]}.")
    out: dict[str, dict[str, np.ndarray]] = {v: {} for v in views}
    for key, array in arrays.items():
        view, name = key.split("/", 1)
        if array.shape != shapes[name]:
            raise MalformedCounts(f"{key} has shape {array.shape}, not {shapes[name]}.")
        if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > MAX_COUNT:
            raise MalformedCounts(f"{key} holds non-finite or out-of-range counts.")
        out[view][name] = np.asarray(array, dtype=np.float64)
    return {view: ScoreCounts.from_arrays(parts) for view, parts in out.items()}


@dataclass(frozen=True, kw_only=True)
class SiteCounts:
    """One site's evaluation as the coordinator pools it."""

    records: int  # its validation records
    metrics: Mapping[str, float]  # what it released (EVAL_METRICS)
    counts: Mapping[str, ScoreCounts]

    @property
    def exact(self) -> bool:
        """The site released its counts and metrics without noise."""
        return self.metrics.get(R.COUNT_NOISE, 1.0) == 0.0


def pooled_metrics(sites: Iterable[SiteCounts]) -> dict[str, float]:
    """The round's validation metrics over every evaluated row (the module docstring)."""
    sites = list(sites)
    if not sites:
        return {}
    if all(s.exact for s in sites):
        return {
            key: _weighted_mean(sites, key)
            for key in (R.LOSS, R.ACCURACY, R.AUROC, R.F1, *R.ABLATION_METRICS)
        }
    records = sum(s.records for s in sites)
    total = _sum(s.counts["lacking"] + s.counts["both"] for s in sites)
    metrics = metrics_from_counts(total, num_examples=records)
    out = {
        R.LOSS: _weighted_mean(sites, R.LOSS),
        R.ACCURACY: metrics.accuracy,
        R.AUROC: metrics.auroc,
        R.F1: metrics.f1,
    }
    for keep, (accuracy, auroc) in R.ABLATION_KEYS.items():
        # the sites that released this view (every site of a run with fields releases them all)
        scored = _ablation(
            [s.counts for s in sites if "image" in s.counts and keep in s.counts], keep
        )
        out[accuracy], out[auroc] = scored.accuracy, scored.auroc
    return out


def _weighted_mean(sites: list[SiteCounts], key: str) -> float:
    """The sites' released values of `key` weighted by validation records (nan values skipped)."""
    pairs = [
        (s.metrics[key], s.records)
        for s in sites
        if key in s.metrics and math.isfinite(s.metrics[key])
    ]
    weight = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / weight if weight else math.nan


def _ablation(sites: list[Mapping[str, ScoreCounts]], keep: str) -> Metrics:
    if not sites:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan)
    total = _sum(c[keep] for c in sites)
    rows = max(round(float(total.scores[0].sum())), 1)
    return metrics_from_counts(total, num_examples=rows)


def _sum(counts: Iterable[ScoreCounts]) -> ScoreCounts:
    items = list(counts)
    total = items[0]
    for c in items[1:]:
        total = total + c
    return total
