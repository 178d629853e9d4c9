"""What each modality contributes: the learned fusion weights, and the model with a modality masked.

Two measures, for any fusion mode:
- `weighted` fusion learns Z = sum_i w_i * phi(M_i); its weights (image, text) when both are
  present are read from the trainable state (`modality_weights`), so the coordinator records them
  each round from the aggregate it already holds.
- A modality ablation masks one modality exactly as a missing one is masked in training and
  prediction (`has_image` / `has_text` false; see `common.model.fusion`): `masked` keeps only
  the named modality. `reliance` turns the AUROCs with both and with a modality masked into
  the share of the model's above-chance AUROC that the modality carries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from common.model.fusion import Features

MODALITIES = ("image", "text", "tabular")  # in the order of the fusion's modalities
KEEP = ("both", "image", "text")  # `both`: every modality the row has
WEIGHT_LOGITS = "fusion.logits.table.weight"  # WeightedFusion's logits (1, M) in the model state


def keeps(features: Features) -> tuple[str, ...]:
    """The ablation's views for these features: KEEP, and with declared fields `tabular` (the
    fields only) and `no-tabular` (every modality but the fields: what the fields add)."""
    return KEEP if features.has_tabular is None else (*KEEP, "tabular", "no-tabular")


def masked(features: Features, keep: str) -> Features:
    """The features with every modality but `keep` masked as missing (`both`: unchanged;
    `no-tabular`: only the structured fields masked)."""
    if keep not in keeps(features):
        raise ValueError(f"keep must be one of {keeps(features)}, got {keep!r}")
    if keep == "both":
        return features
    if keep == "no-tabular" and features.has_tabular is not None:
        return features._replace(has_tabular=torch.zeros_like(features.has_tabular))
    flags = {"image": features.has_image, "text": features.has_text}
    if features.has_tabular is not None:
        flags["tabular"] = features.has_tabular
    return features._replace(
        **{f"has_{m}": torch.zeros_like(flag) for m, flag in flags.items() if m != keep}
    )


def modality_weights(state: Mapping[str, Any]) -> dict[str, float] | None:
    """The weighted fusion's weights {image, text[, tabular]} from a trainable state; None for
    other modes."""
    logits = state.get(WEIGHT_LOGITS)
    if logits is None:
        return None
    values = np.asarray(
        logits.numpy() if hasattr(logits, "numpy") else logits, dtype=np.float64
    ).reshape(-1)
    if values.shape not in ((2,), (3,)) or not np.isfinite(values).all():
        return None
    weights = np.exp(values - values.max())
    weights /= weights.sum()
    return {name: float(w) for name, w in zip(MODALITIES, weights, strict=False)}


def reliance(auroc_both: float | None, auroc_masked: float | None) -> float | None:
    """Share of the above-chance AUROC lost when a modality is masked (None when undefined).

    (AUROC_both - AUROC_masked) / (AUROC_both - 0.5), with AUROC_masked the AUROC without that
    modality (the image only, for the report; without the fields, for the structured fields):
    1 means the model is at chance without it, 0 means it adds nothing; below 0, masking helps.
    """
    if not (
        isinstance(auroc_both, (int, float))
        and math.isfinite(auroc_both)
        and isinstance(auroc_masked, (int, float))
        and math.isfinite(auroc_masked)
    ):
        return None
    if auroc_both <= 0.5:
        return None  # no above-chance AUROC to share out
    return (auroc_both - auroc_masked) / (auroc_both - 0.5)
