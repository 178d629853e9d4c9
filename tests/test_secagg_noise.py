"""Integer noise for distributed DP (common/secagg/noise.py): the right mean and variance."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg.noise import discrete_gaussian, secure_generator, skellam


@pytest.mark.parametrize("sample", [skellam, discrete_gaussian])
@pytest.mark.parametrize("variance", [4.0, 400.0])
def test_noise_has_mean_zero_and_the_asked_variance(sample: object, variance: float) -> None:
    rng = np.random.default_rng(20261205)
    x = sample(variance=variance, size=100_000, rng=rng)  # type: ignore[operator]
    assert x.dtype == np.int64 and x.shape == (100_000,)
    # standard errors at n = 1e5: mean sqrt(v / n), variance about v * sqrt(2 / n) = 0.0045 v
    assert abs(x.mean()) < 5 * np.sqrt(variance / 100_000)
    assert x.var() == pytest.approx(variance, rel=0.025)


def test_skellam_shares_sum_to_skellam_of_the_summed_variance() -> None:
    """Ten sites each adding variance 10 give one Skellam of variance 100 (mu = 50 per side)."""
    stats = pytest.importorskip("scipy.stats")  # the reference distribution (via scikit-learn)
    rng = np.random.default_rng(7)
    total = np.sum([skellam(variance=10.0, size=100_000, rng=rng) for _ in range(10)], axis=0)
    edges = np.arange(-30, 31)  # +-3 sigma, one bin per value, the tails merged at the ends
    observed = np.bincount(np.clip(total, -30, 30) + 30, minlength=61)
    expected = stats.skellam.pmf(edges, 50, 50)
    expected[0], expected[-1] = stats.skellam.cdf(-30, 50, 50), stats.skellam.sf(29, 50, 50)
    result = stats.chisquare(observed, expected * total.size)
    assert result.pvalue > 0.001


def test_secure_generators_are_seeded_apart() -> None:
    a, b = secure_generator(), secure_generator()
    assert not np.array_equal(a.integers(0, 2**62, 4), b.integers(0, 2**62, 4))


@pytest.mark.parametrize("variance", [0.0, -1.0, float("nan"), float("inf")])
def test_a_variance_out_of_range_is_an_error(variance: float) -> None:
    with pytest.raises(ValueError, match="variance"):
        skellam(variance=variance, size=3, rng=np.random.default_rng(0))
