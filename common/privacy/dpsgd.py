"""DP-SGD for one round: Opacus' engine around the site's model, optimizer and loader.

The accountant starts from the run's account (`common.privacy.accounting.Account`), so the round's
steps compose with every earlier round. The Opacus wrapper never leaks out of this module: the
model is hooked in place (`wrap_model=False`) and unhooked when the round ends, so parameter
names never change.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from common.errors import Failure
from common.privacy.accounting import Account


@dataclass
class PrivateSession:
    """The DP-wrapped optimizer, loss and Poisson loader for one round of local training."""

    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader
    engine: PrivacyEngine

    def spent(self, account: Account) -> Account:
        """`account` after the steps taken in this session."""
        return account.after(self.engine.accountant.history)


@contextmanager
def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     account: Account, *, max_grad_norm: float,
                     grad_sample_mode: str) -> Iterator[PrivateSession]:
    """Hook `model` for DP-SGD with the account's noise and history restored; unhook on exit."""
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: torchcsprng does not build for torch 2.x.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=account.accountant)
    engine.accountant.load_state_dict(
        OrderedDict(history=list(account.history), mechanism=engine.accountant.mechanism()))
    criterion = nn.CrossEntropyLoss()
    model.train()  # Opacus validates the module in training mode
    out = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=account.noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, wrap_model=False, grad_sample_mode=grad_sample_mode)
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, criterion, dp_loader = out
    else:
        hooks, dp_optimizer, dp_loader = out
    if not math.isclose(dp_loader.sample_rate, account.sample_rate):
        hooks.cleanup()
        raise Failure(
            f"Opacus samples at rate {dp_loader.sample_rate} but the run's account was planned for "
            f"{account.sample_rate}: the site's training set or batch size changed mid-run.",
            reason="interrupted")
    try:
        yield PrivateSession(dp_optimizer, criterion, dp_loader, engine)
    finally:
        hooks.cleanup()
