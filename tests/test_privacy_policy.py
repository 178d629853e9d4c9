"""The site's policy and its enforcement: stricter terms, refusals, budgets over runs."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from client.rounds import train_round
from client.state import SiteState
from common import protocol as R
from common.errors import Refusal
from common.privacy.accounting import epsilon_from_history, local_steps
from common.privacy.enforcement import LocalPlan, authorize_round, negotiate
from common.privacy.ledger import RunEntry, load_ledger
from common.privacy.policy import PolicyError, SitePolicy, load_policy
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import hospital, request, tiny_run, tiny_user_config


def test_policy_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('max-epsilon = 3\ndelta = 1e-6\nbudget-scope = "dataset"\nrequire-dp = true\n')
    assert load_policy(path) == SitePolicy(max_epsilon=3.0, delta=1e-6, budget_scope="dataset")
    for text, message in [
        ("max-epsilon = -1\n", "max-epsilon must be > 0"),
        ("max_epsilon = 3\n", r"unknown key\(s\) \['max_epsilon'\]"),
        ('require-dp = "yes"\n', "'require-dp' must be a bool"),
        ('budget-scope = "forever"\n', "budget-scope must be one of"),
        ("max-epsilon = \n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(PolicyError, match=message):
            load_policy(path)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "absent.toml")


def test_the_stricter_of_policy_and_proposal_wins() -> None:
    run = tiny_run(**{"max-grad-norm": 5.0})
    policy = SitePolicy(max_epsilon=3.0, delta=1e-6, max_rounds=2, max_max_grad_norm=2.0)
    terms = negotiate(
        policy, run, dp=True, target_epsilon=8.0, target_delta=1e-5, num_rounds=5, num_examples=100
    )
    assert (terms.epsilon_cap, terms.delta, terms.planned_rounds, terms.max_grad_norm) == (
        3.0,
        1e-6,
        2,
        2.0,
    )
    # without a delta of its own, a site of N records allows at most 1 / (10 N)
    default = negotiate(
        SitePolicy(),
        run,
        dp=True,
        target_epsilon=8.0,
        target_delta=1e-2,
        num_rounds=5,
        num_examples=400,
    )
    assert default.delta == pytest.approx(1 / 4000) and default.budget_scope == "dataset"
    assert default.epsilon_cap == 8.0
    loose = negotiate(
        SitePolicy(max_epsilon=20.0, budget_scope="run"),
        run,
        dp=True,
        target_epsilon=8.0,
        num_examples=100,
        target_delta=1e-5,
        num_rounds=5,
    )
    assert loose.run_epsilon == 8.0  # the site never loosens the server's proposal either
    with pytest.raises(Refusal, match="the server asked to train without") as refused:
        negotiate(
            SitePolicy(),
            run,
            dp=False,
            target_epsilon=8.0,
            target_delta=1e-5,
            num_rounds=5,
            num_examples=100,
        )
    assert refused.value.reason == "dp-required"


def _copy_with_policies(demo_root: Path, dest: Path, policies: dict[int, str]) -> Path:
    for i in range(3):
        shutil.copytree(demo_root / f"hospital-{i}", dest / f"hospital-{i}")
    for i, text in policies.items():
        (dest / f"hospital-{i}" / "policy.toml").write_text(text)
    return dest


def _federation(data: Path, out: Path, sites: int, **overrides: object) -> RunFolder:
    settings = {
        "output-dir": str(out),
        "run-name": "t",
        "state-root": str(out / "state"),
        **overrides,
    }
    grid = InProcessGrid(
        client_app, [{"partition-id": i} for i in range(sites)], tiny_user_config(data, **settings)
    )
    return RunFolder(run_federation(grid, tiny_run(data, **settings)))


@pytest.mark.slow
def test_a_site_trains_within_its_cap_then_refuses_and_the_others_finish(
    demo_root: Path, tmp_path: Path
) -> None:
    data = _copy_with_policies(
        demo_root,
        tmp_path / "data",
        {
            1: "max-epsilon = 4.0\nmax-rounds = 2\nmin-eval-records = 1\n",
            2: "max-epsilon = 2.0\nmin-eval-records = 1\n",
        },
    )
    out = _federation(data, tmp_path / "out", 3, **{"num-server-rounds": 3})
    history = out.read_history()
    trained = [sorted(n for n, s in h.sites.items() if s.train is not None) for h in history]
    assert trained == [["hospital-0", "hospital-1", "hospital-2"]] * 2 + [
        ["hospital-0", "hospital-2"]
    ]
    assert "max-rounds = 2" in history[2].refusals["hospital-1"]
    assert (
        history[2].sites["hospital-1"].evaluate is not None
    )  # it still evaluates the global model
    # nothing charged for the refused round; each evaluation is charged
    state = tmp_path / "out" / "state" / "hospital-1" / "state"
    assert [(r.round, r.kind) for r in read_receipts(state)] == [
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
        (3, "evaluate"),
    ]
    summary = out.read_summary()
    assert summary.status == "completed"
    sites = summary.sites
    assert sites["hospital-1"].rounds_trained == [1, 2] and sites["hospital-1"].rounds_refused == [
        3
    ]
    # each site its own epsilon, under its own cap, spent over the rounds and evaluations it planned
    for site, cap in (("hospital-0", 8.0), ("hospital-1", 4.0), ("hospital-2", 2.0)):
        spent = read_receipts(tmp_path / "out" / "state" / site / "state")[-1].epsilon
        assert 0.95 * cap < spent <= cap * (1 + 1e-6)
        assert (
            sites[site].epsilon <= spent
        )  # as of its last training round (no policy: exact metrics, nothing charged)


def test_require_dp_refuses_a_run_without_dp_and_the_run_ends_cleanly(
    demo_root: Path, tmp_path: Path
) -> None:
    data = _copy_with_policies(
        demo_root, tmp_path / "data", {0: "require-dp = true\n", 1: "require-dp = true\n"}
    )
    out = _federation(data, tmp_path / "out", 2, dp=False, **{"num-server-rounds": 2})
    summary = out.read_summary()
    assert summary.status == "stopped"
    assert "Refused: hospital-0: refused: " in summary.message
    # a simulated hospital adds the detail to the fixed reason (its researcher plays every party)
    assert (
        summary.message.count(
            "refused: dp-required: the site's policy requires differential "
            "privacy (the server asked to train without"
        )
        == 2
    )
    (line,) = out.read_history()
    assert set(line.refusals) == {"hospital-0", "hospital-1"} and not line.sites
    assert not (tmp_path / "out" / "state" / "hospital-0" / "state" / "receipts.jsonl").exists()


def test_a_simulated_hospital_without_a_policy_follows_the_runs_dp_setting(
    demo_root: Path, tmp_path: Path
) -> None:
    """The researcher plays every simulated hospital: without a policy.toml, `dp` decides."""
    out = _federation(demo_root, tmp_path / "out", 2, dp=False, **{"num-server-rounds": 1})
    (line,) = out.read_history()
    assert not line.refusals and all(s.train[R.EPSILON] is None for s in line.sites.values())


def test_dataset_scope_composes_runs_and_refuses_when_spent(
    demo_root: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('max-epsilon = 6.0\nbudget-scope = "dataset"\n')
    # epochs of batch 64 (the older defaults): the two runs spend the cap to within 0.2
    run = tiny_run(
        demo_root,
        accountant="rdp",
        target_epsilon=4.0,
        num_server_rounds=1,
        **{"local-steps": 0, "batch-size": 64, "fraction-evaluate": 0.0},
    )
    state = SiteState(hospital(demo_root, tmp_path / "state", 2, policy))
    where = state.site

    def one_run(run_id: str, target: float) -> float:
        assert run.privacy.target_epsilon == target
        return train_round(state, run, request(state, run, 1, run_key=run_id)).receipt.scope_epsilon

    first = one_run("run-1", 4.0)  # this run alone: at most the server's 4.0
    assert 3.8 < first <= 4.0
    second = one_run("run-2", 4.0)  # composed with run-1: at most the cap of 6.0
    assert 5.8 < second <= 6.0
    ledger = load_ledger(where.state_dir)
    composed = epsilon_from_history(
        [*ledger.run("run-1").account.history, *ledger.run("run-2").account.history],
        delta=1e-5,
        accountant="rdp",
    )
    assert composed == pytest.approx(second, abs=1e-6)
    with pytest.raises(Refusal, match="privacy budget is exhausted: earlier runs"):
        one_run("run-3", 4.0)
    assert [r.run_id for r in read_receipts(where.state_dir)] == ["run-1", "run-2"]


@settings(max_examples=8, deadline=None)
@given(
    cap=st.floats(0.5, 10.0),
    target=st.floats(0.5, 10.0),
    max_rounds=st.integers(1, 5),
    server_rounds=st.integers(1, 6),
    n=st.integers(20, 400),
    batch=st.sampled_from([8, 32, 64]),
)
@pytest.mark.slow
def test_random_policies_never_decrease_or_exceed_the_cap(
    cap: float, target: float, max_rounds: int, server_rounds: int, n: int, batch: int
) -> None:
    run = tiny_run(accountant="rdp", **{"batch-size": batch, "local-epochs": 1, "local-steps": 0})
    policy = SitePolicy(max_epsilon=cap, max_rounds=max_rounds)
    terms = negotiate(
        policy,
        run,
        dp=True,
        target_epsilon=target,
        target_delta=1e-5,
        num_examples=n,
        num_rounds=server_rounds,
    )
    entry, epsilons = None, [0.0]
    for r in range(1, server_rounds + 1):
        try:
            account = authorize_round(
                terms, entry, [], policy, LocalPlan(num_examples=n, batch_size=batch, epochs=1)
            )
        except Refusal:
            assert r > min(max_rounds, server_rounds)
            continue
        steps = local_steps(num_examples=n, batch_size=batch, epochs=1)
        # what training charges: this round's steps at the run's noise and rate
        account = account.after(
            [*account.history, (account.noise_multiplier, account.sample_rate, steps)]
        )
        entry = RunEntry(
            dataset="d", account=account, rounds=(entry.rounds if entry else ()) + (r,)
        )
        epsilons.append(account.epsilon)
    assert all(b >= a for a, b in itertools.pairwise(epsilons))
    assert epsilons[-1] <= min(cap, target) * (1 + 1e-6)
    assert len(epsilons) - 1 == min(max_rounds, server_rounds)
    assert math.isfinite(epsilons[-1])
