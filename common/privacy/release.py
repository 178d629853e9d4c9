"""What a site releases besides its update, as Gaussian mechanisms charged to its account.

Each release is the Gaussian mechanism: a vector of sums over the site's rows in which one row
moves at most `sensitivity` (L2), plus N(0, (noise_multiplier x sensitivity)^2) noise per
coordinate. One release costs the same as one DP-SGD step at sampling rate 1 with that noise
multiplier, so it enters the run's accountant history as (noise_multiplier, 1.0, 1) and composes
with the training steps (`common.privacy.accounting`).

- Evaluation: score histograms and a confusion matrix per view of the validation rows
  (`common.training.score_counts`); the metrics are computed from the noisy counts.
- Training loss (only where the site's policy shares it): the sum of each training row's loss,
  clipped to [0, LOSS_CLIP], over the row count (a public fact).

The noise comes from the operating system's entropy, never from the run's seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.privacy.accounting import HistoryEntry
from common.training.score_counts import ScoreCounts

LOSS_CLIP = 3.0  # a row's loss in a released training loss is clipped to [0, LOSS_CLIP]


def release_entry(noise_multiplier: float) -> HistoryEntry:
    """One release's entry in the accountant history."""
    return (float(noise_multiplier), 1.0, 1)


@dataclass(frozen=True, kw_only=True)
class CountsRelease:
    """The counts a site releases of an evaluation, and the noise added to each count."""

    views: dict[str, ScoreCounts]
    noise_std: float  # standard deviation of the noise on every count (0: exact)


def counts_sensitivity(views: Mapping[str, ScoreCounts], views_per_row: int) -> float:
    """Counts' L2 sensitivity: a row adds `cells_per_row` counts in up to `views_per_row` views."""
    cells = next(iter(views.values())).cells_per_row
    return math.sqrt(cells * views_per_row)


def release_counts(
    views: Mapping[str, ScoreCounts], *, noise_multiplier: float, views_per_row: int
) -> CountsRelease:
    """The counts with Gaussian noise (noise_multiplier 0: exact, outside any DP guarantee)."""
    std = noise_multiplier * counts_sensitivity(views, views_per_row)
    if std == 0:
        return CountsRelease(views=dict(views), noise_std=0.0)
    rng = np.random.default_rng()  # seeded from the operating system's entropy
    noisy = {
        name: ScoreCounts(
            c.scores + rng.normal(0.0, std, c.scores.shape),
            None if c.confusion is None else c.confusion + rng.normal(0.0, std, c.confusion.shape),
        )
        for name, c in views.items()
    }
    return CountsRelease(views=noisy, noise_std=std)


def release_mean_loss(losses: np.ndarray, *, noise_multiplier: float) -> float:
    """The mean of per-row losses (N,) clipped to [0, LOSS_CLIP], with Gaussian noise on the sum.

    Non-finite losses count as LOSS_CLIP, so every row moves the sum by at most LOSS_CLIP.
    """
    n = len(losses)
    if n == 0:
        return math.nan
    clipped = np.clip(
        np.nan_to_num(
            np.asarray(losses, dtype=np.float64), nan=LOSS_CLIP, posinf=LOSS_CLIP, neginf=0.0
        ),
        0.0,
        LOSS_CLIP,
    )
    noise = np.random.default_rng().normal(0.0, noise_multiplier * LOSS_CLIP)
    return float((clipped.sum() + noise) / n)
