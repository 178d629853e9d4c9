"""Privacy accounting at a site: noise calibration, epsilon of a history, and a run's account.

Sample-level DP per site (Abadi et al. 2016, "Deep Learning with Differential Privacy"). The noise
multiplier is calibrated once per run from the site's target (epsilon, delta), the planned rounds,
its local steps per round and its sampling rate. The accountant's history is the run's account:
it is restored before every round and extended after it, so the epsilon a site reports is its
cumulative spend over the whole run, not one round's (as it would be with a fresh PrivacyEngine
per round). Pure math on Opacus' accountants; the DP-SGD wiring is `common.privacy.dpsgd`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV
from opacus.accountants.registry import create_accountant

from common.errors import Refusal

log = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
# Opacus' RDP orders, extended: its largest (63) floors epsilon near log(1/delta)/62 ~ 0.19, too
# coarse for a small budget's releases; higher orders only tighten the bound at small epsilons
RDP_ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256, 8), *range(256, 4097, 128)]
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, training is noise: the budget is too low to train
MIN_NOISE_MULTIPLIER = 0.1  # below this one step spends epsilon > 100 (the largest target) at
# any usual rate; the search never goes lower (more noise than needed is always safe)
MAX_TOTAL_STEPS = 10**6  # DP-SGD steps a run may plan at a site
CALIBRATION_SECONDS = 60.0  # noise calibration never holds the state folder's lock longer
# PRV's cost is its discretisation, 70 to 180 bytes per point and history entry (measured: 3.6M
# points, 10^4 steps at q 0.045 and sigma 1: +250 MB, 0.9 s; 21M points: +3.4 GB, 19 s; 10^5 steps
# at sigma 1: 57M points). At 1M a whole calibration peaked at +0.6 GB and took at most 3.6 s;
# 10^4 steps at epsilon 8 still get the least noise (sigma 2.80), larger runs more (use "rdp").
MAX_PRV_POINTS = 1_000_000


class BudgetTooLow(Exception):
    """No noise level lets this run stay within the privacy target."""


class AccountingLimit(Refusal):
    """Accounting this history would take more steps, time or memory than a site allows."""

    default_reason = "accounting-limit"


# opacus ships no type information (ignore_missing_imports): its classes are Any to mypy
class _BoundedPRV(PRVAccountant):  # type: ignore[misc]
    """Opacus' PRV accountant that refuses a discretisation larger than `MAX_PRV_POINTS`."""

    def _get_domain(
        self,
        prvs: list[PoissonSubsampledGaussianPRV],
        num_self_compositions: list[int],
        eps_error: float,
        delta_error: float,
    ) -> Domain:
        domain = super()._get_domain(
            prvs=prvs,
            num_self_compositions=num_self_compositions,
            eps_error=eps_error,
            delta_error=delta_error,
        )
        if domain.size * len(prvs) > MAX_PRV_POINTS:
            raise AccountingLimit(
                f"the PRV accountant would discretise this history on {domain.size * len(prvs):,} "
                f"points (at most {MAX_PRV_POINTS:,}: its memory and time grow with them). Plan "
                'fewer rounds or local steps, more noise, or use accountant = "rdp".'
            )
        return domain


def local_steps(
    *, num_examples: int, batch_size: int, epochs: int, steps_per_round: int = 0
) -> int:
    """Optimizer steps per round: `steps_per_round` when set (> 0), whatever the site's size;
    else `epochs` passes of Opacus' Poisson loader, which yields ceil(N / B) batches per epoch."""
    if steps_per_round > 0:
        return steps_per_round
    return epochs * math.ceil(num_examples / batch_size)


def sample_rate(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus sets it (1 / number of batches)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def loader_batch(*, num_examples: int, rate: float) -> int:
    """A loader batch at which Opacus samples at `rate` (a `sample_rate` of this site's size):
    ceil(N / m) for m = 1 / rate batches, which gives ceil(N / ceil(N / m)) = m batches again."""
    return math.ceil(num_examples / round(1.0 / rate))


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    prior_history: Sequence[HistoryEntry] = (),
    deadline_s: float = CALIBRATION_SECONDS,
) -> float:
    """The noise multiplier that spends at most the target over `total_steps` (once per run).

    With `prior_history` (earlier runs on the same data), the target bounds the composition
    of that history and this run. Bisection on sigma (epsilon falls as the noise grows) between
    `MIN_NOISE_MULTIPLIER` and `MAX_NOISE_MULTIPLIER`, bounded in steps, time and memory: a sigma
    whose PRV account would exceed `MAX_PRV_POINTS` counts as spending too much (more noise is
    always safe); past `MAX_TOTAL_STEPS` or the deadline it refuses (AccountingLimit).
    """
    if not 1 <= total_steps <= MAX_TOTAL_STEPS or not 0 < sample_rate <= 1:
        raise AccountingLimit(
            f"Cannot plan {total_steps} steps at sampling rate {sample_rate:g}: "
            f"a run plans 1 to {MAX_TOTAL_STEPS} steps at a rate in (0, 1]."
        )
    if not (0 < target_epsilon < math.inf and 0 < target_delta < 1):  # NaN fails both
        raise BudgetTooLow(
            f"The target epsilon={target_epsilon} at delta={target_delta} is not a "
            "finite epsilon > 0 and a delta in (0, 1)."
        )
    stop = time.monotonic() + deadline_s

    def spent(sigma: float) -> float:
        if time.monotonic() > stop:
            raise AccountingLimit(
                f"Noise calibration took longer than {deadline_s:g} s; nothing "
                "was trained. Plan fewer rounds or local steps."
            )
        try:
            return epsilon_from_history(
                [*prior_history, (sigma, sample_rate, total_steps)],
                delta=target_delta,
                accountant=accountant,
            )
        except AccountingLimit as err:  # too costly to account at this noise: plan with more noise
            costly[sigma] = err
            return math.inf

    costly: dict[float, AccountingLimit] = {}
    low, high = MIN_NOISE_MULTIPLIER, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER and low in costly:
            raise AccountingLimit(f"{costly[low].detail} (even at noise multiplier {low:g}).")
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetTooLow(
                _too_low(target_epsilon, target_delta, total_steps, sample_rate)
                + (
                    " Earlier runs on this dataset have spent most of the budget."
                    if prior_history
                    else ""
                )
            )
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > target_epsilon else (low, mid)
    if low in costly:  # the bound, not the target, set how little noise this run gets
        log.warning(
            "the PRV account of less noise than %.4g would exceed %d points: this run is "
            'planned with noise multiplier %.4g (accountant = "rdp" is not bounded so)',
            low,
            MAX_PRV_POINTS,
            high,
        )
    return high


def _too_low(eps: float, delta: float, steps: int, q: float) -> str:
    return (
        f"Cannot reach epsilon={eps:g} at delta={delta:g} over {steps} steps with sampling "
        f"rate {q:.4f}. Raise the epsilon target or cap, lower the number of rounds or "
        "local epochs, or raise the batch size."
    )


def epsilon_from_history(
    history: Sequence[HistoryEntry], *, delta: float, accountant: str
) -> float:
    """Cumulative epsilon of a ledger, recomputed with a fresh Opacus accountant."""
    if not history:
        return 0.0
    # one entry per mechanism (noise, rate): composition commutes, and each PRV entry costs a
    # discretisation of its own (a round's projection would otherwise double the run's)
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(n)
    return _epsilon(tuple((s, q, n) for (s, q), n in steps.items()), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # pure math, and slow (RDP at small rates: ~0.4 s a call): sites of one size calibrate the
    # same noise, a bisection and every round's account ask the same histories again
    acc = _BoundedPRV() if accountant == "prv" else create_accountant(accountant)
    acc.load_state_dict(OrderedDict(history=list(history), mechanism=acc.mechanism()))
    with warnings.catch_warnings():
        # PRV at sampling rate 1 (a release: the plain Gaussian mechanism) takes log(1 - q) = -inf
        # on the way; the result is right (within 2% of the analytic Gaussian mechanism's epsilon)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS))
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True, kw_only=True)
class Account:
    """One run's privacy account at a site: its calibrated noise, its history and what it spent.

    The history holds the DP-SGD steps (noise_multiplier, sample_rate, steps) and the releases
    (evaluation counts, a training loss: `common.privacy.release`) as (release_noise_multiplier,
    1.0, 1). `epsilon` is computed when the history changes (`after`), never on read.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: tuple[HistoryEntry, ...] = field(default=())
    epsilon: float = 0.0  # cumulative over this run
    # noise of every release of the run, per unit of its sensitivity (0: the account was
    # opened before releases were accounted, or none was planned: the site releases nothing it
    # would charge)
    release_noise_multiplier: float = 0.0
    # DP-SGD steps in each round of the run, as the site's recipe chose them when the account
    # was opened (common.privacy.recipe); 0: the run's local epochs decide (or an older ledger)
    steps_per_round: int = 0

    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken so far in this run."""
        return sum(int(s) for _, _, s in self.history)

    def after(self, history: Sequence[HistoryEntry]) -> Account:
        """This account with a new accountant history (and its epsilon)."""
        history = tuple((float(s), float(q), int(n)) for s, q, n in history)
        return replace(
            self,
            history=history,
            epsilon=epsilon_from_history(history, delta=self.delta, accountant=self.accountant),
        )

    def to_json(self) -> str:
        """Serialise (for the ledger file)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Account:
        """Inverse of `to_json`."""
        d = json.loads(text)
        history = tuple((float(s), float(q), int(n)) for s, q, n in d.pop("history"))
        return cls(history=history, **d)
