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
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from opacus.accountants.registry import create_accountant

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, training is noise: the budget is too low to train
MAX_TOTAL_STEPS = 10**6  # DP-SGD steps a run may plan at a site
CALIBRATION_SECONDS = 60.0  # noise calibration never holds the state folder's lock longer


class BudgetTooLow(Exception):
    """No noise level lets this run stay within the privacy target."""


def local_steps(*, num_examples: int, batch_size: int, epochs: int, steps_per_round: int = 0) -> int:
    """Optimizer steps per round: `steps_per_round` when set (> 0), whatever the site's size;
    else `epochs` passes of Opacus' Poisson loader, which yields ceil(N / B) batches per epoch."""
    if steps_per_round > 0:
        return steps_per_round
    return epochs * math.ceil(num_examples / batch_size)


def sample_rate(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus sets it (1 / number of batches)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(*, target_epsilon: float, target_delta: float, sample_rate: float,
                    total_steps: int, accountant: str,
                    prior_history: Sequence[HistoryEntry] = (),
                    deadline_s: float = CALIBRATION_SECONDS) -> float:
    """The noise multiplier that spends at most the target over `total_steps` (once per run).

    With `prior_history` (earlier runs on the same data), the target bounds the composition
    of that history and this run. Bisection on sigma (epsilon falls as the noise grows), bounded
    in steps and in time: it fails closed (BudgetTooLow) rather than run on.
    """
    if not 1 <= total_steps <= MAX_TOTAL_STEPS or not 0 < sample_rate <= 1:
        raise BudgetTooLow(f"Cannot plan {total_steps} steps at sampling rate {sample_rate:g}: "
                           f"a run plans 1 to {MAX_TOTAL_STEPS} steps at a rate in (0, 1].")
    stop = time.monotonic() + deadline_s

    def spent(sigma: float) -> float:
        if time.monotonic() > stop:
            raise BudgetTooLow(f"Noise calibration took longer than {deadline_s:g} s; nothing was "
                               "trained. Plan fewer rounds or local steps.")
        return epsilon_from_history([*prior_history, (sigma, sample_rate, total_steps)],
                                    delta=target_delta, accountant=accountant)

    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetTooLow(_too_low(target_epsilon, target_delta, total_steps, sample_rate)
                               + (" Earlier runs on this dataset have spent most of the budget."
                                  if prior_history else ""))
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > target_epsilon else (low, mid)
    return high


def _too_low(eps: float, delta: float, steps: int, q: float) -> str:
    return (f"Cannot reach epsilon={eps:g} at delta={delta:g} over {steps} steps with sampling "
            f"rate {q:.4f}. Raise the epsilon target or cap, lower the number of rounds or "
            "local epochs, or raise the batch size.")


def epsilon_from_history(history: Sequence[HistoryEntry], *, delta: float, accountant: str) -> float:
    """Cumulative epsilon of a ledger, recomputed with a fresh Opacus accountant."""
    if not history:
        return 0.0
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # pure math, and slow (RDP at small rates: ~0.4 s a call): sites of one size calibrate the
    # same noise, a bisection and every round's account ask the same histories again
    acc = create_accountant(accountant)
    acc.load_state_dict(OrderedDict(history=list(history), mechanism=acc.mechanism()))
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True, kw_only=True)
class Account:
    """One run's privacy account at a site: its calibrated noise, its history and what it spent.

    `epsilon` is computed when the history changes (`after`), never on read.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: tuple[HistoryEntry, ...] = field(default=())
    epsilon: float = 0.0  # cumulative over this run

    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken so far in this run."""
        return sum(int(s) for _, _, s in self.history)

    def after(self, history: Sequence[HistoryEntry]) -> Account:
        """This account with a new accountant history (and its epsilon)."""
        history = tuple((float(s), float(q), int(n)) for s, q, n in history)
        return replace(self, history=history, epsilon=epsilon_from_history(
            history, delta=self.delta, accountant=self.accountant))

    def to_json(self) -> str:
        """Serialise (for the ledger file)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Account:
        """Inverse of `to_json`."""
        d = json.loads(text)
        history = tuple((float(s), float(q), int(n)) for s, q, n in d.pop("history"))
        return cls(history=history, **d)
