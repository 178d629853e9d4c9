"""The site-adaptive DP recipe: the expected batch and the local steps a site takes per round,
decided at the site.

Under DP-SGD each step adds Gaussian noise of standard deviation sigma * C to the sum of the
clipped per-sample gradients (C the clipping norm), so the noise on the averaged gradient of a
step, per unit of C, is

    noise_ratio = sigma / (q N)        (q the Poisson sampling rate, q N the expected batch)

The two levers act differently. A larger batch lowers the ratio: sigma grows more slowly than q
once sampling amplifies little, which is where small sites are. Fewer steps lower each step's
noise by about sqrt(steps) but the round's movement by steps, so at full batch the round's
signal to noise is unchanged; on the development data fewer steps lost at every site size
(README "The DP recipe"). So a site raises its expected batch, from the run's `batch-size` by
doublings up to `max-batch-size` (or all its records), until the ratio at `local-steps` is
within `max-noise-ratio`, and takes fewer than `local-steps` only when its budget cannot pay
for them. The rule reads only public facts (its number of training records, the batch bounds,
its budget and the run's rounds), never a metric of its data, so choosing releases nothing. It
is decided once per run, when the run's account is opened, and recorded in the account (its
sampling rate and steps), the receipts and the site's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def noise_ratio(*, noise_multiplier: float, sample_rate: float, num_examples: int) -> float:
    """Std of the noise on one step's averaged clipped gradient, per unit of the clipping norm."""
    return noise_multiplier / (sample_rate * num_examples)


def batch_candidates(*, batch_size: int, max_batch_size: int, num_examples: int) -> list[int]:
    """The expected batches a site may take, smallest first: `batch_size` doubled while below
    the largest allowed (`max_batch_size`, at most the site's records), then that largest."""
    largest = min(max(max_batch_size, batch_size), max(num_examples, 1))
    batches = [batch_size]
    while batches[-1] * 2 < largest:
        batches.append(batches[-1] * 2)
    if largest > batches[-1]:
        batches.append(largest)
    return batches


def adapted_batch(
    *, candidates: list[int], max_ratio: float, ratio_at: Callable[[int], float]
) -> int:
    """The smallest candidate batch whose noise ratio (`ratio_at(batch)`) is within `max_ratio`;
    the largest when none is. `max_ratio` <= 0 turns the rule off: the first candidate."""
    if max_ratio <= 0:
        return candidates[0]
    for batch in candidates:
        if ratio_at(batch) <= max_ratio:
            return batch
    return candidates[-1]


def most_steps(*, max_steps: int, fits: Callable[[int], bool]) -> int:
    """The most steps in 1..`max_steps` that `fits` (the budget pays for them; fewer steps
    always fit when more do); 1 when none fits, for the caller's calibration to refuse."""
    if max_steps <= 1 or fits(max_steps):
        return max(max_steps, 1)
    low, high = 1, max_steps  # high does not fit; bisect for the last count that does
    if not fits(low):
        return 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
