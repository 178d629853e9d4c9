"""The site-adaptive DP recipe (issue 25): the expected batch from the site's size and budget,
bounded by the run's batch-size and max-batch-size; steps cut only to fit the budget; decided at
the site and recorded in its account and receipts."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.rounds import train_round
from client.site_config import SiteLimits
from client.state import SiteState
from common.model.trainable import trainable_state
from common.privacy.accounting import calibrate_noise, loader_batch, sample_rate
from common.privacy.enforcement import LocalPlan, negotiate, open_account
from common.privacy.policy import SitePolicy
from common.privacy.receipts import read_receipts
from common.privacy.recipe import adapted_batch, batch_candidates, most_steps, noise_ratio
from tests.conftest import hospital, request, tiny_run

ROUNDS, STEPS, BATCH, MAX_BATCH, RATIO = 3, 20, 32, 128, 0.05


def test_batches_double_from_batch_size_to_the_largest_allowed() -> None:
    assert batch_candidates(batch_size=32, max_batch_size=128, num_examples=300) == [32, 64, 128]
    assert batch_candidates(batch_size=32, max_batch_size=128, num_examples=100) == [32, 64, 100]
    assert batch_candidates(batch_size=32, max_batch_size=128, num_examples=20) == [32]
    assert batch_candidates(batch_size=32, max_batch_size=0, num_examples=300) == [32]
    assert batch_candidates(batch_size=32, max_batch_size=100, num_examples=300) == [32, 64, 100]


def test_the_smallest_batch_within_the_bound_else_the_largest() -> None:
    falling = lambda batch: 1.0 / batch  # noqa: E731
    assert adapted_batch(candidates=[32, 64, 128], max_ratio=0.02, ratio_at=falling) == 64
    assert adapted_batch(candidates=[32, 64, 128], max_ratio=1 / 64, ratio_at=falling) == 64
    assert adapted_batch(candidates=[32, 64, 128], max_ratio=0.001, ratio_at=falling) == 128
    assert adapted_batch(candidates=[32, 64, 128], max_ratio=0.0, ratio_at=falling) == 32
    assert noise_ratio(noise_multiplier=2.0, sample_rate=0.25, num_examples=80) == 0.1


def test_the_most_steps_the_budget_pays_for() -> None:
    assert most_steps(max_steps=20, fits=lambda k: k <= 7) == 7
    assert most_steps(max_steps=20, fits=lambda k: True) == 20
    assert most_steps(max_steps=20, fits=lambda k: False) == 1  # the calibration then refuses


@pytest.mark.parametrize("n", [1, 7, 20, 33, 100, 129, 300, 701])
@pytest.mark.parametrize("batch", [1, 8, 32, 64, 128, 1000])
def test_the_loader_batch_samples_at_the_planned_rate(n: int, batch: int) -> None:
    q = sample_rate(num_examples=n, batch_size=batch)
    assert sample_rate(num_examples=n, batch_size=loader_batch(num_examples=n, rate=q)) == q


def _choice(
    num_examples: int, epsilon: float, ratio: float = RATIO, max_batch: int = MAX_BATCH
) -> tuple[int, int, float]:
    """A site's loader batch at its chosen rate, its steps per round and its noise ratio."""
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
        steps_per_round=STEPS,
        max_noise_ratio=ratio,
        max_batch_size=max_batch,
    )
    account = open_account(terms, [], plan)
    q = account.sample_rate
    return (
        loader_batch(num_examples=num_examples, rate=q),
        account.steps_per_round,
        noise_ratio(
            noise_multiplier=account.noise_multiplier, sample_rate=q, num_examples=num_examples
        ),
    )


@pytest.mark.slow
def test_the_batch_is_bounded_and_never_larger_with_more_budget() -> None:
    sizes, epsilons = (50, 100, 400), (2.0, 8.0)
    chosen = {(n, e): _choice(n, e) for n in sizes for e in epsilons}
    for (n, _), (batch, steps, ratio) in chosen.items():
        rates = [
            sample_rate(num_examples=n, batch_size=b)
            for b in batch_candidates(batch_size=BATCH, max_batch_size=MAX_BATCH, num_examples=n)
        ]
        rate = sample_rate(num_examples=n, batch_size=batch)
        assert rate in rates  # between batch-size and max-batch-size (or all the site's rows)
        assert steps == STEPS  # these budgets pay for every step: steps are never cut for noise
        assert ratio <= RATIO or rate == rates[-1]  # within the bound, or the largest allowed
    for n in sizes:
        assert chosen[n, 8.0][0] <= chosen[n, 2.0][0]
    # a small site raises its batch to all its records; the largest keeps the run's batch-size
    assert chosen[100, 8.0][0] == 100 and chosen[400, 2.0][0] > chosen[400, 8.0][0]
    assert chosen[400, 8.0][0] == loader_batch(num_examples=400, rate=1 / 13)  # ceil(400 / 32)


@pytest.mark.slow
def test_the_chosen_batch_is_the_smallest_whose_planned_noise_fits() -> None:
    """At the chosen batch the ratio fits; at the candidate below it does not (a reference
    calibration of the same account)."""
    n, eps = 300, 2.0
    batch, _, ratio = _choice(n, eps, ratio=0.06)
    candidates = batch_candidates(batch_size=BATCH, max_batch_size=MAX_BATCH, num_examples=n)
    rates = [sample_rate(num_examples=n, batch_size=b) for b in candidates]
    chosen = rates.index(sample_rate(num_examples=n, batch_size=batch))
    assert chosen > 0 and ratio <= 0.06
    below = candidates[chosen - 1]
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
        terms, [], LocalPlan(num_examples=n, batch_size=below, epochs=1, steps_per_round=STEPS)
    ).release_noise_multiplier
    q = sample_rate(num_examples=n, batch_size=below)
    sigma = calibrate_noise(
        target_epsilon=eps,
        target_delta=terms.delta,
        sample_rate=q,
        total_steps=ROUNDS * STEPS,
        accountant=terms.accountant,
        prior_history=[(release, 1.0, terms.planned_releases)],
    )
    assert noise_ratio(noise_multiplier=sigma, sample_rate=q, num_examples=n) > 0.06


@pytest.mark.slow
def test_a_site_trains_at_the_batch_its_recipe_chose_and_records_it(
    demo_root: Path, tmp_path: Path
) -> None:
    run = tiny_run(
        demo_root,
        num_server_rounds=2,
        local_steps=4,
        batch_size=4,
        **{"max-noise-ratio": 0.01, "max-batch-size": 10_000},
    )
    state = SiteState(hospital(demo_root, tmp_path, 0))
    parameters = trainable_state(state.bundle(run.model).model)
    outcomes = []
    for r in (1, 2):
        out = train_round(state, run, request(state, run, r, parameters))
        parameters = {**parameters, **out.state}
        outcomes.append(out)
    account = outcomes[0].account
    assert account is not None
    assert account.sample_rate == 1.0  # a demo hospital this small: the bound asks for all its rows
    assert [o.result.steps for o in outcomes] == [4, 4]
    receipts = [r for r in read_receipts(state.site.state_dir) if r.kind == "train"]
    assert [(r.sample_rate, r.steps) for r in receipts] == [(1.0, 4), (1.0, 4)]
    # the account was planned for that rate: the two rounds spend within the cap
    assert outcomes[-1].account is not None and outcomes[-1].account.epsilon <= 8.0 * (1 + 1e-6)


@pytest.mark.slow
def test_the_node_caps_the_batch_its_recipe_may_raise_to(demo_root: Path, tmp_path: Path) -> None:
    """A node's max-batch bounds the recipe (its memory), whatever the run's max-batch-size."""
    run = tiny_run(
        demo_root,
        num_server_rounds=1,
        local_steps=2,
        batch_size=2,
        **{"max-noise-ratio": 0.001, "max-batch-size": 10_000},
    )
    site = hospital(demo_root, tmp_path, 0, limits=SiteLimits(max_batch=4))
    state = SiteState(site)
    parameters = trainable_state(state.bundle(run.model).model)
    out = train_round(state, run, request(state, run, 1, parameters))
    assert out.account is not None
    rows = len(state.data(run).train)
    assert out.account.sample_rate == sample_rate(num_examples=rows, batch_size=4)  # not all rows
    assert out.account.sample_rate < 1.0


@pytest.mark.parametrize(("ratio", "max_batch"), [(0.0, MAX_BATCH), (RATIO, 0), (10.0, MAX_BATCH)])
def test_without_the_rule_or_under_a_loose_bound_every_site_trains_as_asked(
    ratio: float, max_batch: int
) -> None:
    batch, steps, _ = _choice(100, 8.0, ratio, max_batch)
    assert (sample_rate(num_examples=100, batch_size=batch), steps) == (0.25, STEPS)
