"""The site's privacy gate: the terms it trains under, and whether it may train this round.

The site trains under the stricter of its policy and the server's proposal. Before training it
projects its epsilon after this round; if that would exceed its cap, or the server asks for no
DP while the policy requires it, or the site has trained as many rounds as its policy allows,
it refuses (`common.errors.Refusal`): no training, nothing charged, and a reason in the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.config import RunConfig
from common.errors import Refusal
from common.privacy.accounting import (
    Account,
    BudgetTooLow,
    HistoryEntry,
    calibrate_noise,
    epsilon_from_history,
    local_steps,
    sample_rate,
)
from common.privacy.ledger import RunEntry
from common.privacy.policy import SitePolicy

TOLERANCE = 1e-6  # relative slack for re-computing an epsilon the calibration already bounded
EXHAUSTED_BELOW = 0.01  # less than 1% of a dataset budget left: training would be pure noise


@dataclass(frozen=True, kw_only=True)
class PrivacyTerms:
    """What this site trains under in this run: the stricter of policy and proposal."""

    dp: bool
    run_epsilon: float  # cap on this run's epsilon
    scope_epsilon: float  # cap over the budget scope (this run, or all runs on the dataset)
    delta: float
    max_grad_norm: float
    planned_rounds: int
    budget_scope: str
    accountant: str

    @property
    def epsilon_cap(self) -> float:
        """The most this run's epsilon may reach at this site: the stricter of both caps."""
        return min(self.run_epsilon, self.scope_epsilon)


def negotiate(policy: SitePolicy, run: RunConfig, *, dp: bool, target_epsilon: float,
              target_delta: float, num_rounds: int, num_examples: int) -> PrivacyTerms:
    """Combine the server's proposal with the site's policy; refuse DP-less training if required.

    `num_examples`: the site's training records (the default delta is 1 / (10 N)).
    """
    if not dp and policy.require_dp:
        raise Refusal("the server asked to train without differential privacy; this "
                      "site's policy requires it (require-dp = true).", reason="dp-required")
    run_cap = target_epsilon if policy.budget_scope == "dataset" else min(target_epsilon,
                                                                          policy.max_epsilon)
    clip = min(max(run.privacy.max_grad_norm, policy.min_max_grad_norm), policy.max_max_grad_norm)
    return PrivacyTerms(dp=dp, run_epsilon=run_cap, scope_epsilon=policy.max_epsilon,
                        delta=min(target_delta, policy.delta_for(num_examples)), max_grad_norm=clip,
                        planned_rounds=min(num_rounds, policy.max_rounds),
                        budget_scope=policy.budget_scope, accountant=run.privacy.accountant)


def open_account(terms: PrivacyTerms, prior: Sequence[HistoryEntry], *, num_examples: int,
                 batch_size: int, epochs: int, steps_per_round: int = 0) -> Account:
    """A new run's account: noise calibrated once so that the planned rounds fit every cap."""
    q = sample_rate(num_examples=num_examples, batch_size=batch_size)
    total = terms.planned_rounds * local_steps(num_examples=num_examples, batch_size=batch_size,
                                               epochs=epochs, steps_per_round=steps_per_round)
    common = dict(target_delta=terms.delta, sample_rate=q, total_steps=total,
                  accountant=terms.accountant)
    spent = epsilon_from_history(prior, delta=terms.delta, accountant=terms.accountant)
    if spent >= terms.scope_epsilon * (1 - EXHAUSTED_BELOW):
        raise Refusal(
            f"the privacy budget is exhausted: earlier runs on this dataset spent epsilon "
            f"{spent:.3f} of its cap of {terms.scope_epsilon:g} (budget-scope = dataset).",
            reason="budget-exhausted")
    try:
        sigma = calibrate_noise(target_epsilon=min(terms.run_epsilon, terms.scope_epsilon), **common)
        if prior:
            sigma = max(sigma, calibrate_noise(target_epsilon=terms.scope_epsilon,
                                               prior_history=prior, **common))
    except BudgetTooLow as err:
        raise Refusal(f"the privacy budget is exhausted: {err}", reason="budget-exhausted") from err
    return Account(accountant=terms.accountant, delta=terms.delta, noise_multiplier=sigma,
                   sample_rate=q)


def check_round_count(entry: RunEntry | None, policy: SitePolicy) -> None:
    """Refuse once the site has trained `max-rounds` rounds in this run."""
    trained = len(entry.rounds) if entry else 0
    if trained >= policy.max_rounds:
        raise Refusal(f"this site has trained {trained} rounds in this run, the most its "
                      f"policy allows (max-rounds = {policy.max_rounds}).", reason="max-rounds")


def authorize_round(terms: PrivacyTerms, entry: RunEntry | None, prior: Sequence[HistoryEntry],
                    policy: SitePolicy, *, num_examples: int, batch_size: int,
                    epochs: int, steps_per_round: int = 0) -> Account:
    """The account to train this round with, or a Refusal (nothing is charged)."""
    check_round_count(entry, policy)
    account = entry.account if entry and entry.account else open_account(
        terms, prior, num_examples=num_examples, batch_size=batch_size, epochs=epochs,
        steps_per_round=steps_per_round)
    step = (account.noise_multiplier, account.sample_rate,
            local_steps(num_examples=num_examples, batch_size=batch_size, epochs=epochs,
                        steps_per_round=steps_per_round))
    run_after = epsilon_from_history([*account.history, step], delta=account.delta,
                                     accountant=account.accountant)
    scope_after = epsilon_from_history([*prior, *account.history, step], delta=account.delta,
                                       accountant=account.accountant) if prior else run_after
    for name, after, cap in (("this run's", run_after, terms.run_epsilon),
                             (f"the {terms.budget_scope} budget's", scope_after, terms.scope_epsilon)):
        if after > cap * (1 + TOLERANCE):
            raise Refusal(f"{name} epsilon would reach {after:.3f} after this round, above "
                          f"its cap of {cap:g}; this site stops training.", reason="epsilon-cap")
    return account
