"""DP-SGD for one round: Opacus' engine around the site's model, optimizer and loader.

The accountant starts from the run's account (`common.privacy.accounting.Account`), so the round's
steps compose with every earlier round. The Opacus wrapper never leaks out of this module: the
model is hooked in place (`wrap_model=False`) and unhooked when the round ends, so parameter
names never change.

The coordinator chooses the model a site computes on, so a crafted model may overflow on one
record and not on the others. DP-SGD's guarantee needs every record's contribution bounded, and
a non-finite one is not (Opacus' clipping factor of a NaN gradient is NaN, and so is the noised
sum: whether the update is finite would tell whether that record was sampled). Here a record
whose logits or per-sample gradient are not finite contributes exactly zero, a function of that
record and the model alone, so the update stays a DP function of the data whatever the model:
- the loss sees such a row's logits as zeros that depend on no parameter (`FiniteCrossEntropy`);
- with per-sample gradients (`hooks`), a row with any non-finite entry is zeroed before clipping;
- with ghost clipping, a row whose gradient norm is not finite gets a clipping factor of zero.
How many rows were zeroed stays in the site's log.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from common.data.dataset import Case
from common.errors import Failure
from common.privacy.accounting import Account

log = logging.getLogger(__name__)


class FiniteCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy in which a row with a non-finite logit has zero logits that no parameter
    moves: its loss is log C and its gradient zero (a torch.where, whose other branch gets a
    zero gradient, so no 0 x inf enters the backward pass)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(finite_rows(input), target)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) with each row that has a non-finite entry replaced by zeros."""
    ok = torch.isfinite(logits).all(dim=-1, keepdim=True)
    return torch.where(ok, logits, torch.zeros_like(logits))


@dataclass
class NonFinite:
    """Rows whose contribution was zeroed this round (the site's log only)."""

    rows: int = 0


@dataclass
class PrivateSession:
    """The DP-wrapped optimizer, loss and Poisson loader for one round of local training."""

    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader[Case]
    engine: PrivacyEngine
    non_finite: NonFinite = field(default_factory=NonFinite)

    def spent(self, account: Account) -> Account:
        """`account` after the steps taken in this session."""
        return account.after(self.engine.accountant.history)


def _zero_non_finite_samples(optimizer: torch.optim.Optimizer, count: NonFinite) -> None:
    """Before Opacus clips, zero every per-sample gradient row that holds a non-finite value."""
    # `optimizer` is Opacus' DPOptimizer (untyped: Any to mypy, so typed as torch's Optimizer
    # here); its `clip_and_accumulate` and `params` are unknown to torch's stubs
    clip_and_accumulate: Callable[[], None] = optimizer.clip_and_accumulate  # type: ignore[attr-defined]

    def guarded() -> None:
        samples = optimizer.grad_samples  # type: ignore[attr-defined]  # (B, ...) per parameter
        if samples and len(samples[0]):
            bad = torch.zeros(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for g in samples:
                bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
            if bad.any():
                count.rows += int(bad.sum())
                for p in optimizer.params:  # type: ignore[attr-defined]
                    grad_sample = p.grad_sample
                    for part in grad_sample if isinstance(grad_sample, list) else [grad_sample]:
                        part[bad.to(part.device)] = 0.0
        clip_and_accumulate()

    optimizer.clip_and_accumulate = guarded  # type: ignore[attr-defined]


class _GhostClippingHooks(Protocol):
    """What is used here of Opacus' ghost-clipping module (GradSampleModuleFastGradientClipping)."""

    max_grad_norm: float
    get_norm_sample: Callable[[], torch.Tensor]
    get_clipping_coef: Callable[[], torch.Tensor]


def _zero_non_finite_norms(hooks: _GhostClippingHooks, count: NonFinite) -> None:
    """Ghost clipping: a row whose gradient norm is not finite gets a clipping factor of zero."""
    norms = hooks.get_norm_sample

    def coefficient() -> torch.Tensor:
        norm = norms()
        bad = ~torch.isfinite(norm)
        count.rows += int(bad.sum())
        factor = (hooks.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return torch.where(bad, torch.zeros_like(factor), factor)

    hooks.get_clipping_coef = coefficient


@contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Case],
    account: Account,
    *,
    max_grad_norm: float,
    grad_sample_mode: str,
) -> Iterator[PrivateSession]:
    """Hook `model` for DP-SGD with the account's noise and history restored; unhook on exit."""
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: torchcsprng does not build for torch 2.x.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=account.accountant)
    engine.accountant.load_state_dict(
        OrderedDict(history=list(account.history), mechanism=engine.accountant.mechanism())
    )
    criterion = FiniteCrossEntropy()
    model.train()  # Opacus validates the module in training mode
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=account.noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        wrap_model=False,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, criterion, dp_loader = out
    else:
        hooks, dp_optimizer, dp_loader = out
    if not math.isclose(dp_loader.sample_rate, account.sample_rate):
        hooks.cleanup()
        raise Failure(
            f"Opacus samples at rate {dp_loader.sample_rate} but the run's account was planned for "
            f"{account.sample_rate}: the site's training set or batch size changed mid-run.",
            reason="interrupted",
        )
    session = PrivateSession(dp_optimizer, criterion, dp_loader, engine)
    if grad_sample_mode == "ghost":
        _zero_non_finite_norms(hooks, session.non_finite)
    else:
        _zero_non_finite_samples(dp_optimizer, session.non_finite)
    try:
        yield session
    finally:
        hooks.cleanup()
        if session.non_finite.rows:
            log.warning(
                "%d sampled row(s) had non-finite logits or gradients under the received "
                "model and contributed nothing to the update",
                session.non_finite.rows,
            )
