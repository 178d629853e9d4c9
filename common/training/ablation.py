"""A site's evaluation with a modality ablation: the usual metrics, and the rows that have both
modalities scored with both, with the image only and with the report only.

One pass over the validation split: the encoders run once per batch; the fusion and the head run
once more per masked modality (`common.model.contributions.masked`), so the ablation costs two
small forwards. Rows lacking a modality are left out of the ablation (masking what is missing
measures nothing) but count in the usual metrics. With structured fields declared, the same rows
are also scored with the fields only and with every modality but the fields (what the fields add).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from common.model.contributions import KEEP, keeps, masked
from common.model.fusion_model import FusionModel
from common.training.loop import Batch, metrics_from_logits
from common.training.metrics import Metrics
from common.training.progress import batches, log_line, progress
from common.training.score_counts import ScoreCounts, count_scores, finite_probabilities

log = logging.getLogger(__name__)

# The rows of a release's views: every validation row is in "lacking" (it lacks a modality) or
# "both"; "image" and "text" score the rows with both again with one modality masked, and with
# structured fields declared "tabular" (the fields only) and "no-tabular" (the fields masked).
VIEWS = ("lacking", "both")
ABLATION_VIEWS = ("image", "text")
FIELDS_VIEWS = ("tabular", "no-tabular")


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """Metrics over the rows with both modalities, per kept modality (`both`, `image`, `text`)."""

    num_examples: int  # rows with both modalities
    both: Metrics
    image: Metrics  # the report masked
    text: Metrics  # the image masked
    tabular: Metrics | None = None  # the structured fields only (None: none declared)
    no_tabular: Metrics | None = None  # every modality but the structured fields


@torch.no_grad()
def ablation_logits(
    model: FusionModel,
    batch: Batch,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Logits (B, C) per kept modality, the labels (B,) and which rows have both modalities (B,)."""
    b = {k: v.to(device) for k, v in batch.items()}
    labels = b.pop("labels")
    features = model.encode(**b)
    logits = {
        keep: model.classify(masked(features, keep)).float().cpu() for keep in keeps(features)
    }
    both = (features.has_image & features.has_text).cpu()
    return logits, labels.cpu(), both


@dataclass(frozen=True, kw_only=True)
class AblationScores:
    """The logits of every validation row per kept modality, its label and whether it has both."""

    logits: dict[str, torch.Tensor]  # keep (KEEP, and `keeps` with fields) -> (N, C)
    labels: torch.Tensor  # (N,)
    both: torch.Tensor  # (N,) bool: the row has an image and a report


@torch.no_grad()
def ablation_scores(
    model: FusionModel, loader: Iterable[Batch], device: torch.device, desc: str = "evaluate"
) -> AblationScores:
    """One pass over `loader`: the logits with both modalities, the image only, the report only."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("labels", "rows")}
    for batch in progress(loader, desc=desc, total=batches(loader)):
        logits, labels, both = ablation_logits(model, batch, device)
        for keep, value in logits.items():
            parts.setdefault(keep, []).append(value)
        parts["labels"].append(labels)
        parts["rows"].append(both)
    if not parts["labels"]:
        empty = torch.zeros(0, 0)
        kept = KEEP if model.tabular is None else (*KEEP, *FIELDS_VIEWS)
        return AblationScores(
            logits={k: empty for k in kept},
            labels=torch.zeros(0, dtype=torch.long),
            both=torch.zeros(0, dtype=torch.bool),
        )
    cat = {k: torch.cat(v) for k, v in parts.items()}
    views = {k: v for k, v in cat.items() if k not in ("labels", "rows")}
    return AblationScores(logits=views, labels=cat["labels"], both=cat["rows"])


def exact_metrics(scores: AblationScores) -> tuple[Metrics, Ablation]:
    """The usual metrics over every row, and the ablation over the rows with both modalities."""
    labels, rows = scores.labels, scores.both
    metrics = metrics_from_logits(scores.logits["both"], labels)
    if not len(labels):
        return metrics, Ablation(num_examples=0, both=metrics, image=metrics, text=metrics)
    scored = {
        keep: metrics_from_logits(logits[rows], labels[rows])
        for keep, logits in scores.logits.items()
    }
    return metrics, Ablation(
        num_examples=int(rows.sum()),
        both=scored["both"],
        image=scored["image"],
        text=scored["text"],
        tabular=scored.get("tabular"),
        no_tabular=scored.get("no-tabular"),
    )


@torch.no_grad()
def evaluate_with_ablation(
    model: FusionModel, loader: Iterable[Batch], device: torch.device, desc: str = "evaluate"
) -> tuple[Metrics, Ablation]:
    """The usual metrics over every row, and the ablation over the rows with both modalities."""
    start = time.perf_counter()
    metrics, ablation = exact_metrics(ablation_scores(model, loader, device, desc))
    log_ablation(desc, metrics, ablation, time.perf_counter() - start)
    return metrics, ablation


def log_ablation(desc: str, metrics: Metrics, ablation: Ablation, seconds: float) -> None:
    """The exact metrics in the site's log (they stay at the site)."""
    log_line(
        log,
        "%s: %d examples, loss %.4f, accuracy %.3f, AUROC %.3f; AUROC on %d rows with "
        "both: %.3f both, %.3f image only, %.3f report only, %.1f s",
        desc,
        metrics.num_examples,
        metrics.loss,
        metrics.accuracy,
        metrics.auroc,
        ablation.num_examples,
        ablation.both.auroc,
        ablation.image.auroc,
        ablation.text.auroc,
        seconds,
    )
    if ablation.tabular is not None and ablation.no_tabular is not None:
        log_line(
            log,
            "%s: AUROC on the same rows: %.3f structured fields only, %.3f without them",
            desc,
            ablation.tabular.auroc,
            ablation.no_tabular.auroc,
        )


def views_per_row(views: Iterable[str]) -> int:
    """How many of these views one validation row can add counts to: one of lacking/both, and
    every ablation view."""
    return 1 + sum(1 for v in views if v not in VIEWS)


def view_counts(
    scores: AblationScores, num_classes: int, *, ablation: bool
) -> dict[str, ScoreCounts]:
    """The score counts per view (`ablation`: with the image-only and report-only views, and the
    fields' two when the model has structured fields)."""
    labels, both = scores.labels.numpy(), scores.both.numpy().astype(bool)
    probs = {
        k: finite_probabilities(v.numpy().reshape(len(labels), -1))
        if len(labels)
        else np.zeros((0, num_classes))
        for k, v in scores.logits.items()
    }
    views = {
        "lacking": count_scores(probs["both"][~both], labels[~both], num_classes),
        "both": count_scores(probs["both"][both], labels[both], num_classes),
    }
    if ablation:
        views |= {
            keep: count_scores(probs[keep][both], labels[both], num_classes)
            for keep in (*ABLATION_VIEWS, *FIELDS_VIEWS)
            if keep in probs
        }
    return views
