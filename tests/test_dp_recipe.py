"""The site-adaptive DP recipe (issue 25): steps per round from the site's size and budget,
bounded by the coordinator's local-steps, decided at the site and recorded in its receipts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from client.rounds import train_round
from client.state import SiteState
from common.model.trainable import trainable_state
from common.privacy.accounting import calibrate_noise
from common.privacy.enforcement import LocalPlan, negotiate, open_account
from common.privacy.policy import SitePolicy
from common.privacy.receipts import read_receipts
from common.privacy.recipe import adapted_steps, noise_ratio
from tests.conftest import hospital, request, tiny_run

ROUNDS, MAX_STEPS, BATCH, RATIO = 3, 20, 32, 0.05


def test_the_most_steps_within_the_bound_at_least_one_at_most_asked() -> None:
    linear = lambda steps: 0.01 * steps  # noqa: E731
    assert adapted_steps(max_steps=20, max_ratio=0.055, ratio_at=linear) == 5
    assert adapted_steps(max_steps=20, max_ratio=0.05, ratio_at=linear) == 5  # at the bound: in
    assert adapted_steps(max_steps=20, max_ratio=1.0, ratio_at=linear) == 20  # never more
    assert adapted_steps(max_steps=20, max_ratio=0.001, ratio_at=linear) == 1  # never fewer
    assert adapted_steps(max_steps=20, max_ratio=0.0, ratio_at=linear) == 20  # the rule off
    assert adapted_steps(max_steps=20, max_ratio=0.05, ratio_at=lambda s: math.inf) == 1
    assert noise_ratio(noise_multiplier=2.0, sample_rate=0.25, num_examples=80) == 0.1


def _steps(num_examples: int, epsilon: float, ratio: float = RATIO) -> tuple[int, float]:
    """A site's chosen steps per round and its planned noise ratio at them."""
    run = tiny_run(**{"num-server-rounds": ROUNDS})
    terms = negotiate(
        SitePolicy(max_epsilon=epsilon, budget_scope="run"),
        run,
        dp=True,
        target_epsilon=epsilon,
        target_delta=1e-5,
        num_rounds=ROUNDS,
        num_examples=num_examples,
    )
    plan = LocalPlan(
        num_examples=num_examples,
        batch_size=BATCH,
        epochs=1,
        steps_per_round=MAX_STEPS,
        max_noise_ratio=ratio,
    )
    account = open_account(terms, [], plan)
    return account.steps_per_round, noise_ratio(
        noise_multiplier=account.noise_multiplier,
        sample_rate=account.sample_rate,
        num_examples=num_examples,
    )


@pytest.mark.slow
def test_more_records_or_more_budget_never_mean_fewer_steps() -> None:
    sizes, epsilons = (16, 100, 400), (2.0, 8.0)
    steps = {(n, e): _steps(n, e) for n in sizes for e in epsilons}
    for k, ratio in steps.values():
        assert 1 <= k <= MAX_STEPS
        assert ratio <= RATIO or k == 1  # within the bound, or the fewest steps there are
    for e in epsilons:
        chosen = [steps[n, e][0] for n in sizes]
        assert chosen == sorted(chosen), (e, chosen)
    for n in sizes:
        assert steps[n, 2.0][0] <= steps[n, 8.0][0]
    # the small site gives up steps, the large one keeps every step the coordinator asked for
    assert steps[16, 8.0][0] < MAX_STEPS and steps[400, 8.0][0] == MAX_STEPS


@pytest.mark.slow
def test_the_chosen_steps_are_the_most_whose_planned_noise_fits() -> None:
    """At the chosen K the ratio fits, at K + 1 it does not (a reference calibration)."""
    n, eps = 100, 8.0
    k, ratio = _steps(n, eps)
    assert 1 < k < MAX_STEPS and ratio <= RATIO
    terms = negotiate(
        SitePolicy(max_epsilon=eps, budget_scope="run"),
        tiny_run(**{"num-server-rounds": ROUNDS}),
        dp=True,
        target_epsilon=eps,
        target_delta=1e-5,
        num_rounds=ROUNDS,
        num_examples=n,
    )
    release = open_account(
        terms, [], LocalPlan(num_examples=n, batch_size=BATCH, epochs=1, steps_per_round=k)
    ).release_noise_multiplier
    sigma = calibrate_noise(
        target_epsilon=eps,
        target_delta=terms.delta,
        sample_rate=1 / math.ceil(n / BATCH),
        total_steps=ROUNDS * (k + 1),
        accountant=terms.accountant,
        prior_history=[(release, 1.0, terms.planned_releases)],
    )
    q = 1 / math.ceil(n / BATCH)
    assert noise_ratio(noise_multiplier=sigma, sample_rate=q, num_examples=n) > RATIO


@pytest.mark.slow
def test_a_site_trains_and_records_the_steps_its_recipe_chose(
    demo_root: Path, tmp_path: Path
) -> None:
    run = tiny_run(
        demo_root,
        num_server_rounds=2,
        local_steps=MAX_STEPS,
        batch_size=BATCH,
        **{"max-noise-ratio": 0.05},
    )
    state = SiteState(hospital(demo_root, tmp_path, 0))
    parameters = trainable_state(state.bundle(run.model).model)
    outcomes = []
    for r in (1, 2):
        out = train_round(state, run, request(state, run, r, parameters))
        parameters = {**parameters, **out.state}
        outcomes.append(out)
    chosen = outcomes[0].account.steps_per_round
    assert 1 <= chosen < MAX_STEPS  # a demo hospital of this size takes fewer steps
    assert [o.result.steps for o in outcomes] == [chosen, chosen]
    receipts = [r for r in read_receipts(state.site.state_dir) if r.kind == "train"]
    assert [r.steps for r in receipts] == [chosen, chosen]
    # the account was planned for exactly those steps: the two rounds spend within the cap
    assert outcomes[-1].account.epsilon <= 8.0 * (1 + 1e-6)


@pytest.mark.parametrize("ratio", [0.0, 10.0])
def test_without_the_rule_or_under_a_loose_bound_every_site_takes_local_steps(ratio: float) -> None:
    assert _steps(16, 8.0, ratio)[0] == MAX_STEPS
