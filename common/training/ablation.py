"""A site's evaluation with a modality ablation: the usual metrics, and the rows that have both
modalities scored with both, with the image only and with the report only.

One pass over the validation split: the encoders run once per batch; the fusion and the head run
once more per masked modality (`common.model.contributions.masked`), so the ablation costs two
small forwards. Rows lacking a modality are left out of the ablation (masking what is missing
measures nothing) but count in the usual metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from common.model.contributions import KEEP, masked
from common.model.fusion_model import FusionModel
from common.training.loop import Batch, metrics_from_logits
from common.training.metrics import Metrics
from common.training.progress import batches, log_line, progress

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """Metrics over the rows with both modalities, per kept modality (`both`, `image`, `text`)."""

    num_examples: int  # rows with both modalities
    both: Metrics
    image: Metrics  # the report masked
    text: Metrics  # the image masked


@torch.no_grad()
def ablation_logits(model: FusionModel, batch: Batch, device: torch.device,
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Logits (B, C) per kept modality, the labels (B,) and which rows have both modalities (B,)."""
    b = {k: v.to(device) for k, v in batch.items()}
    labels = b.pop("labels")
    features = model.encode(**b)
    logits = {keep: model.classify(masked(features, keep)).float().cpu() for keep in KEEP}
    both = (features.has_image & features.has_text).cpu()
    return logits, labels.cpu(), both


@torch.no_grad()
def evaluate_with_ablation(model: FusionModel, loader: Iterable[Batch], device: torch.device,
                           desc: str = "evaluate") -> tuple[Metrics, Ablation]:
    """The usual metrics over every row, and the ablation over the rows with both modalities."""
    start = time.perf_counter()
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*KEEP, "labels", "rows")}
    for batch in progress(loader, desc=desc, total=batches(loader)):
        logits, labels, both = ablation_logits(model, batch, device)
        for keep in KEEP:
            parts[keep].append(logits[keep])
        parts["labels"].append(labels)
        parts["rows"].append(both)
    if not parts["labels"]:
        empty = metrics_from_logits(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
        return empty, Ablation(num_examples=0, both=empty, image=empty, text=empty)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    labels, rows = cat["labels"], cat["rows"]
    metrics = metrics_from_logits(cat["both"], labels)
    scored = {keep: metrics_from_logits(cat[keep][rows], labels[rows]) for keep in KEEP}
    ablation = Ablation(num_examples=int(rows.sum()), both=scored["both"], image=scored["image"],
                        text=scored["text"])
    log_line(log, "%s: %d examples, loss %.4f, accuracy %.3f; AUROC on %d rows with both: "
             "%.3f both, %.3f image only, %.3f report only, %.1f s", desc, metrics.num_examples,
             metrics.loss, metrics.accuracy, ablation.num_examples, ablation.both.auroc,
             ablation.image.auroc, ablation.text.auroc, time.perf_counter() - start)
    return metrics, ablation
