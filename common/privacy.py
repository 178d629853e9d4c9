"""Differential privacy at a site: noise calibration, the accountant ledger, and DP-SGD wiring.

Sample-level DP per site (Abadi et al. 2016, "Deep Learning with Differential Privacy"). The noise
multiplier is calibrated once per run from the site's target (epsilon, delta), the planned rounds,
its local steps per round and its sampling rate. The accountant's history is the ledger: it is
restored before every round and saved after it, so the epsilon a site reports is its cumulative
spend over the whole run, not one round's (as it would be with a fresh PrivacyEngine per round).
The Opacus wrapper never leaks out of this module: the model is hooked in place
(`wrap_model=False`) and unhooked when the round ends, so parameter names never change.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.accountants.registry import create_accountant
from torch import nn
from torch.utils.data import DataLoader

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, training is noise: the budget is too low to train


class BudgetTooLow(ValueError):
    """No noise level lets this run stay within the privacy target."""


def local_steps(*, num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps per round: Opacus' Poisson loader yields ceil(N / B) batches per epoch."""
    return epochs * math.ceil(num_examples / batch_size)


def sample_rate(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus sets it (1 / number of batches)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(*, target_epsilon: float, target_delta: float, sample_rate: float,
                    total_steps: int, accountant: str,
                    prior_history: Sequence[HistoryEntry] = ()) -> float:
    """The noise multiplier that spends at most the target over `total_steps` (once per run).

    With `prior_history` (earlier runs on the same data), the target bounds the composition
    of that history and this run.
    """
    if not prior_history:
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                               sample_rate=sample_rate, steps=total_steps,
                                               accountant=accountant))
        except ValueError as err:
            raise BudgetTooLow(_too_low(target_epsilon, target_delta, total_steps, sample_rate)) from err

    def spent(sigma: float) -> float:
        return epsilon_from_history([*prior_history, (sigma, sample_rate, total_steps)],
                                    delta=target_delta, accountant=accountant)

    # bisection on sigma: epsilon decreases as the noise grows
    low, high = 0.05, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetTooLow(_too_low(target_epsilon, target_delta, total_steps, sample_rate)
                               + " Earlier runs on this dataset have spent most of the budget.")
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
    acc = create_accountant(accountant)
    acc.load_state_dict(OrderedDict(history=list(history), mechanism=acc.mechanism()))
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Ledger:
    """A site's privacy state for one run: its calibrated noise and accountant history."""

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: tuple[HistoryEntry, ...] = field(default=())

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon spent so far in this run."""
        return epsilon_from_history(list(self.history), delta=self.delta, accountant=self.accountant)

    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken so far in this run."""
        return sum(int(s) for _, _, s in self.history)

    def to_json(self) -> str:
        """Serialise (for Context.state or a file)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Inverse of `to_json`."""
        d = json.loads(text)
        history = tuple((float(s), float(q), int(n)) for s, q, n in d.pop("history"))
        return cls(history=history, **d)


@dataclass
class PrivateSession:
    """The DP-wrapped optimizer, loss and Poisson loader for one round of local training."""

    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader
    engine: PrivacyEngine


@contextmanager
def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     ledger: Ledger, *, max_grad_norm: float,
                     grad_sample_mode: str) -> Iterator[PrivateSession]:
    """Hook `model` for DP-SGD with the ledger's noise and history restored; unhook on exit.

    After the block, `session.engine.accountant.history` holds the updated ledger history.
    """
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: torchcsprng does not build for torch 2.x.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.load_state_dict(
        OrderedDict(history=list(ledger.history), mechanism=engine.accountant.mechanism()))
    criterion = nn.CrossEntropyLoss()
    model.train()  # Opacus validates the module in training mode
    out = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=ledger.noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, wrap_model=False, grad_sample_mode=grad_sample_mode)
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, criterion, dp_loader = out
    else:
        hooks, dp_optimizer, dp_loader = out
    if not math.isclose(dp_loader.sample_rate, ledger.sample_rate):
        hooks.cleanup()
        raise ValueError(
            f"Opacus samples at rate {dp_loader.sample_rate} but the ledger was planned for "
            f"{ledger.sample_rate}: the site's training set or batch size changed mid-run.")
    try:
        yield PrivateSession(dp_optimizer, criterion, dp_loader, engine)
    finally:
        hooks.cleanup()


def updated_ledger(ledger: Ledger, engine: PrivacyEngine) -> Ledger:
    """The ledger after a round trained with `engine`."""
    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    return Ledger(ledger.accountant, ledger.delta, ledger.noise_multiplier, ledger.sample_rate, history)
