"""The site's privacy gate: the terms it works under, and whether it may train or release.

The site trains under the stricter of its policy and the server's proposal. A run's account is
planned once, at its first round or release: the releases the run may make (evaluations, a
training loss: `common.privacy.release`) get `evaluation-share` of the cap, and the training
noise is calibrated so that every planned step and release together fit the cap. Before each
round or release the site projects its epsilon after it; if that would exceed its cap, or the
server asks for no DP while the policy requires it, or the site has trained as many rounds as
its policy allows, it refuses (`common.errors.Refusal`): nothing done, nothing charged, and a
reason in the reply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

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
from common.privacy.recipe import adapted_batch, batch_candidates, most_steps, noise_ratio
from common.privacy.release import release_entry

log = logging.getLogger(__name__)

TOLERANCE = 1e-6  # relative slack for re-computing an epsilon the calibration already bounded
EXHAUSTED_BELOW = 0.01  # less than 1% of a dataset budget left: training would be pure noise


class _Calibration(TypedDict):
    """The arguments every `calibrate_noise` call of a run's account shares."""

    target_delta: float
    sample_rate: float
    total_steps: int
    accountant: str


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
    planned_releases: int = 0  # evaluations and training losses the run may release (charged)
    evaluation_share: float = 0.1  # of the cap, planned for those releases
    # planned_rounds = 0: an evaluation-only site; its releases get the whole cap
    exact_metrics: bool = False  # metrics are released exactly (no account, no charge)

    @property
    def private_releases(self) -> bool:
        """Evaluation metrics and a training loss leave only as charged, noisy releases."""
        return self.dp and not self.exact_metrics

    @property
    def epsilon_cap(self) -> float:
        """The most this run's epsilon may reach at this site: the stricter of both caps."""
        return min(self.run_epsilon, self.scope_epsilon)


def negotiate(
    policy: SitePolicy,
    run: RunConfig,
    *,
    dp: bool,
    target_epsilon: float,
    target_delta: float,
    num_rounds: int,
    num_examples: int,
) -> PrivacyTerms:
    """Combine the server's proposal with the site's policy; refuse DP-less training if required.

    `num_examples`: the site's training records (the default delta is 1 / (10 N)).
    """
    if not dp and policy.require_dp:
        raise Refusal(
            "the server asked to train without differential privacy; this "
            "site's policy requires it (require-dp = true).",
            reason="dp-required",
        )
    run_cap = (
        target_epsilon
        if policy.budget_scope == "dataset"
        else min(target_epsilon, policy.max_epsilon)
    )
    clip = min(max(run.privacy.max_grad_norm, policy.min_max_grad_norm), policy.max_max_grad_norm)
    planned_rounds = 0 if policy.evaluate_only else min(num_rounds, policy.max_rounds)
    evaluations = num_rounds if policy.share_metrics and run.federation.fraction_evaluate > 0 else 0
    losses = planned_rounds if policy.share_train_loss else 0
    return PrivacyTerms(
        dp=dp,
        run_epsilon=run_cap,
        scope_epsilon=policy.max_epsilon,
        delta=min(target_delta, policy.delta_for(num_examples)),
        max_grad_norm=clip,
        planned_rounds=planned_rounds,
        budget_scope=policy.budget_scope,
        accountant=run.privacy.accountant,
        planned_releases=0 if policy.exact_metrics else evaluations + losses,
        evaluation_share=1.0 if policy.evaluate_only else policy.evaluation_share,
        exact_metrics=policy.exact_metrics,
    )


def open_account(terms: PrivacyTerms, prior: Sequence[HistoryEntry], plan: LocalPlan) -> Account:
    """A new run's account: noise calibrated once so that the planned rounds and releases fit
    every cap (the releases alone spend at most `evaluation_share` of what the run may spend).

    In step mode, with `plan.max_noise_ratio` > 0, the site first chooses its expected batch and
    steps per round (`common.privacy.recipe`).
    """
    trains = terms.planned_rounds > 0  # else an evaluation-only site
    q = sample_rate(num_examples=plan.num_examples, batch_size=plan.batch_size) if trains else 0.0
    spent = epsilon_from_history(prior, delta=terms.delta, accountant=terms.accountant)
    if spent >= terms.scope_epsilon * (1 - EXHAUSTED_BELOW):
        raise Refusal(
            f"the privacy budget is exhausted: earlier runs on this dataset spent epsilon "
            f"{spent:.3f} of its cap of {terms.scope_epsilon:g} (budget-scope = dataset).",
            reason="budget-exhausted",
        )
    try:
        release_sigma = _release_noise(terms, spent)
        planned = [(release_sigma, 1.0, terms.planned_releases)] if terms.planned_releases else []
        if not trains:  # no DP-SGD step is planned: none may be taken (train_round refuses)
            return Account(
                accountant=terms.accountant,
                delta=terms.delta,
                noise_multiplier=0.0,
                sample_rate=q,
                release_noise_multiplier=release_sigma,
            )
        q, steps, sigma = _recipe(terms, prior, planned, plan)
    except BudgetTooLow as err:
        raise Refusal(f"the privacy budget is exhausted: {err}", reason="budget-exhausted") from err
    return Account(
        accountant=terms.accountant,
        delta=terms.delta,
        noise_multiplier=sigma,
        sample_rate=q,
        release_noise_multiplier=release_sigma,
        steps_per_round=steps if plan.steps_per_round > 0 else 0,
    )


def _training_noise(
    terms: PrivacyTerms,
    prior: Sequence[HistoryEntry],
    planned: Sequence[HistoryEntry],
    q: float,
    total: int,
) -> float:
    """The DP-SGD noise multiplier for `total` steps: with the planned releases, within the run's
    cap; with earlier runs on the same data too, within the dataset's."""
    common = _Calibration(
        target_delta=terms.delta, sample_rate=q, total_steps=total, accountant=terms.accountant
    )
    sigma = calibrate_noise(
        target_epsilon=min(terms.run_epsilon, terms.scope_epsilon),
        prior_history=planned,
        **common,
    )
    if prior:
        sigma = max(
            sigma,
            calibrate_noise(
                target_epsilon=terms.scope_epsilon, prior_history=[*prior, *planned], **common
            ),
        )
    return sigma


def _recipe(
    terms: PrivacyTerms,
    prior: Sequence[HistoryEntry],
    planned: Sequence[HistoryEntry],
    plan: LocalPlan,
) -> tuple[float, int, float]:
    """The site's sampling rate, steps per round and their noise multiplier: the plan's, or in
    step mode under `plan.max_noise_ratio` the recipe's choice. Each (rate, steps) pair is
    calibrated once."""
    asked = local_steps(
        num_examples=plan.num_examples,
        batch_size=plan.batch_size,
        epochs=plan.epochs,
        steps_per_round=plan.steps_per_round,
    )
    noise: dict[tuple[float, int], float] = {}

    def sigma_at(q: float, steps: int) -> float:
        if (q, steps) not in noise:
            noise[q, steps] = _training_noise(
                terms, prior, planned, q, terms.planned_rounds * steps
            )
        return noise[q, steps]

    def rate(batch: int) -> float:
        return sample_rate(num_examples=plan.num_examples, batch_size=batch)

    if plan.steps_per_round <= 0 or plan.max_noise_ratio <= 0:
        q = rate(plan.batch_size)
        return q, asked, sigma_at(q, asked)

    def ratio_at(batch: int) -> float:
        try:
            sigma = sigma_at(rate(batch), asked)
        except BudgetTooLow:  # a larger batch may not fit the budget at every step either
            return math.inf
        return noise_ratio(
            noise_multiplier=sigma, sample_rate=rate(batch), num_examples=plan.num_examples
        )

    def fits(q: float, steps: int) -> bool:
        try:
            sigma_at(q, steps)
        except BudgetTooLow:
            return False
        return True

    candidates = batch_candidates(
        batch_size=plan.batch_size,
        max_batch_size=plan.max_batch_size,
        num_examples=plan.num_examples,
    )
    batch = adapted_batch(candidates=candidates, max_ratio=plan.max_noise_ratio, ratio_at=ratio_at)
    q = rate(batch)
    steps = most_steps(max_steps=asked, fits=lambda k: fits(q, k))
    sigma = sigma_at(q, steps)  # raises BudgetTooLow when even one step does not fit
    log.info(
        "DP recipe: expected batch %.0f (batch-size=%d, max-batch-size=%d; sampling rate %.3g "
        "of %d training records) and %d of local-steps=%d per round: noise ratio %.3g, "
        "max-noise-ratio=%g",
        q * plan.num_examples,
        plan.batch_size,
        plan.max_batch_size,
        q,
        plan.num_examples,
        steps,
        asked,
        noise_ratio(noise_multiplier=sigma, sample_rate=q, num_examples=plan.num_examples),
        plan.max_noise_ratio,
    )
    return q, steps, sigma


def _release_noise(terms: PrivacyTerms, spent: float) -> float:
    """The noise multiplier of each planned release: together they spend `evaluation_share` of
    what this run may spend (its cap, or what earlier runs left of the dataset's)."""
    if not terms.planned_releases:
        return 0.0
    left = min(terms.run_epsilon, terms.scope_epsilon - spent)
    return calibrate_noise(
        target_epsilon=terms.evaluation_share * left,
        target_delta=terms.delta,
        sample_rate=1.0,
        total_steps=terms.planned_releases,
        accountant=terms.accountant,
    )


def check_round_count(entry: RunEntry | None, policy: SitePolicy) -> None:
    """Refuse once the site has trained `max-rounds` rounds in this run."""
    trained = len(entry.rounds) if entry else 0
    if trained >= policy.max_rounds:
        raise Refusal(
            f"this site has trained {trained} rounds in this run, the most its "
            f"policy allows (max-rounds = {policy.max_rounds}).",
            reason="max-rounds",
        )


@dataclass(frozen=True, kw_only=True)
class LocalPlan:
    """How the site trains each round of the run: its size, batch and local work."""

    num_examples: int
    batch_size: int
    epochs: int
    steps_per_round: int = 0  # > 0: step mode, an upper bound on the steps per round
    max_noise_ratio: float = 0.0  # the recipe's bound (common.privacy.recipe); 0: as asked
    max_batch_size: int = 0  # the largest expected batch the recipe may take (0: batch_size)


def run_account(
    terms: PrivacyTerms, entry: RunEntry | None, prior: Sequence[HistoryEntry], plan: LocalPlan
) -> Account:
    """The run's account: the one in the ledger, or a new one planned for the whole run."""
    if entry and entry.account:
        return entry.account
    return open_account(terms, prior, plan)


def authorize_round(
    terms: PrivacyTerms,
    entry: RunEntry | None,
    prior: Sequence[HistoryEntry],
    policy: SitePolicy,
    plan: LocalPlan,
) -> Account:
    """The account to train this round with, or a Refusal (nothing is charged)."""
    check_round_count(entry, policy)
    account = run_account(terms, entry, prior, plan)
    step = (account.noise_multiplier, account.sample_rate, round_steps(account, plan))
    check_caps(terms, account, prior, step, what="this round")
    return account


def round_steps(account: Account | None, plan: LocalPlan) -> int:
    """The DP-SGD steps of each round of the run: as its account planned them (step mode), or
    the plan's epochs."""
    if account is not None and account.steps_per_round > 0:
        return account.steps_per_round
    return local_steps(
        num_examples=plan.num_examples,
        batch_size=plan.batch_size,
        epochs=plan.epochs,
        steps_per_round=plan.steps_per_round,
    )


def authorize_release(
    terms: PrivacyTerms, entry: RunEntry | None, prior: Sequence[HistoryEntry], plan: LocalPlan
) -> Account:
    """The account to charge one release (an evaluation, a training loss) to, or a Refusal."""
    account = run_account(terms, entry, prior, plan)
    if account.release_noise_multiplier <= 0:
        raise Refusal(
            "this run's privacy plan at the site set no budget aside for releases "
            "(the run planned no evaluation, or its account predates accounted "
            "evaluation); start a new run to evaluate.",
            reason="release-not-planned",
        )
    check_caps(
        terms, account, prior, release_entry(account.release_noise_multiplier), what="this release"
    )
    return account


def check_caps(
    terms: PrivacyTerms,
    account: Account,
    prior: Sequence[HistoryEntry],
    step: HistoryEntry,
    *,
    what: str,
) -> None:
    """Refuse when the run's or the budget scope's epsilon would exceed its cap after `step`."""
    run_after = epsilon_from_history(
        [*account.history, step], delta=account.delta, accountant=account.accountant
    )
    scope_after = (
        epsilon_from_history(
            [*prior, *account.history, step], delta=account.delta, accountant=account.accountant
        )
        if prior
        else run_after
    )
    for name, after, cap in (
        ("this run's", run_after, terms.run_epsilon),
        (f"the {terms.budget_scope} budget's", scope_after, terms.scope_epsilon),
    ):
        if after > cap * (1 + TOLERANCE):
            raise Refusal(
                f"{name} epsilon would reach {after:.3f} after {what}, above its cap "
                f"of {cap:g}; this site stops.",
                reason="epsilon-cap",
            )
