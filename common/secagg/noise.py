"""Integer noise for distributed DP under secure aggregation: Skellam and discrete Gaussian.

Each site adds its share of the noise before masking, so the coordinator only sees the sum.
Skellam noise is convenient because the sum of independent Skellam(mu_i) variables is
Skellam(sum mu_i) (a difference of Poissons, and Poissons add): n sites each adding variance
v / n give exactly Skellam noise of variance v in the sum (Agarwal et al. 2021). The sum of
discrete Gaussians is only close to a discrete Gaussian (Kairouz et al. 2021). How much noise,
and the accounting, is a later step; this module only samples.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
from numpy.typing import NDArray

MAX_SAMPLES = 100_000_000


def secure_generator() -> np.random.Generator:
    """A numpy generator seeded with 256 bits from the operating system's CSPRNG."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def _check(variance: float, size: int) -> None:
    if not (math.isfinite(variance) and 0 < variance <= 2.0**60):
        raise ValueError(f"the noise variance must be finite and in (0, 2**60], not {variance}")
    if not 0 <= size <= MAX_SAMPLES:
        raise ValueError(f"the noise size must be in [0, {MAX_SAMPLES}], not {size}")


def skellam(*, variance: float, size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Skellam noise of the given variance: Poisson(v / 2) - Poisson(v / 2)."""
    _check(variance, size)
    mu = variance / 2
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def discrete_gaussian(*, variance: float, size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Discrete Gaussian noise N_Z(0, sigma^2 = variance) by rejection from a discrete Laplace.

    Its variance is sigma^2 within exp(-2 pi^2 sigma^2) relatively: equal for sigma >= 1.
    The sampler of Canonne, Kamath and Steinke 2020 (Algorithm 3), vectorised, with the
    acceptance test in floating point rather than their exact Bernoulli: fine for calibration,
    not a constant-time implementation.
    """
    _check(variance, size)
    sigma2 = variance
    t = math.floor(math.sqrt(sigma2)) + 1  # the discrete Laplace's scale
    p = 1 - math.exp(-1 / t)
    out = np.empty(0, dtype=np.int64)
    while out.size < size:
        batch = max(2 * (size - out.size), 64)
        y = rng.geometric(p, batch).astype(np.int64) - rng.geometric(p, batch).astype(np.int64)
        accept = rng.random(batch) < np.exp(-((np.abs(y) - sigma2 / t) ** 2) / (2 * sigma2))
        out = np.concatenate([out, y[accept]])
    return out[:size]
