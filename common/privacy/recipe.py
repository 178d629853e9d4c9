"""The site-adaptive DP recipe: how many local steps a site takes per round, decided at the site.

A coordinator's `local-steps` is an upper bound. Under DP-SGD each step adds Gaussian noise of
standard deviation sigma * C to the sum of the clipped per-sample gradients (C the clipping norm),
so the noise on the averaged gradient of a step, per unit of C, is

    noise_ratio = sigma / (q N)        (q the Poisson sampling rate, q N the expected batch)

For a fixed budget, sigma grows with the number of planned steps, and fastest at a small site
(where q cannot be small). A site takes the most steps, up to `local-steps`, whose planned noise
ratio stays within `max-noise-ratio`; at least one. The rule reads only public facts (its
number of training records, its batch, its budget and the run's rounds), never a metric of its
data, so choosing the steps releases nothing. It is decided once per run, when the run's account
is opened, and recorded in the account, the receipts and the site's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def noise_ratio(*, noise_multiplier: float, sample_rate: float, num_examples: int) -> float:
    """Std of the noise on one step's averaged clipped gradient, per unit of the clipping norm."""
    return noise_multiplier / (sample_rate * num_examples)


def adapted_steps(
    *,
    max_steps: int,
    max_ratio: float,
    ratio_at: Callable[[int], float],
) -> int:
    """The most steps per round in 1..`max_steps` whose noise ratio (`ratio_at(steps)`, which
    grows with the steps) is at most `max_ratio`; 1 when even one step exceeds it.

    `max_ratio` <= 0 turns the rule off: `max_steps`, as the coordinator asked.
    """
    if max_ratio <= 0 or max_steps <= 1 or ratio_at(max_steps) <= max_ratio:
        return max(max_steps, 1)
    low, high = 1, max_steps  # ratio_at(high) > max_ratio; bisect for the last step within it
    if ratio_at(low) > max_ratio:
        return 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ratio_at(mid) <= max_ratio else (low, mid)
    return low
