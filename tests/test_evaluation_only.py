"""Evaluation-only sites (issue 25): a hospital that never trains but validates the federation's
model on every record it holds, charged like any evaluation and pooled apart (external validation).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from client.app import app as client_app
from common import protocol as R
from common.privacy.accounting import calibrate_noise, epsilon_from_history
from common.privacy.enforcement import LocalPlan, negotiate, open_account
from common.privacy.policy import PolicyError, SitePolicy, load_policy
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config

EXTERNAL_SITE = "hospital-2"


def test_an_evaluation_only_account_plans_no_step_and_the_whole_cap_for_releases(
    tmp_path: Path,
) -> None:
    run = tiny_run(**{"num-server-rounds": 4})
    policy = _policy(tmp_path, "evaluate-only = true\nmax-epsilon = 2.0\n")
    terms = negotiate(
        policy, run, dp=True, target_epsilon=8.0, target_delta=1e-5, num_rounds=4, num_examples=50
    )
    assert terms.planned_rounds == 0 and terms.planned_releases == 4
    plan = LocalPlan(num_examples=50, batch_size=32, epochs=1, steps_per_round=5)
    account = open_account(terms, [], plan)
    assert account.noise_multiplier == 0.0 and account.sample_rate == 0.0
    expected = calibrate_noise(
        target_epsilon=2.0,
        target_delta=terms.delta,
        sample_rate=1.0,
        total_steps=4,
        accountant=run.privacy.accountant,
    )
    assert account.release_noise_multiplier == pytest.approx(expected)
    # its four releases spend the cap, no more
    spent = epsilon_from_history(
        [(account.release_noise_multiplier, 1.0, 4)],
        delta=terms.delta,
        accountant=run.privacy.accountant,
    )
    assert 1.9 < spent <= 2.0 * (1 + 1e-6)


def test_a_site_that_neither_trains_nor_evaluates_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="evaluate-only needs share-metrics"):
        _policy(tmp_path, "evaluate-only = true\nshare-metrics = false\n")


@pytest.mark.slow
def test_an_evaluation_only_site_never_trains_and_is_pooled_apart(
    demo_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for i in range(3):
        shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
    (data / EXTERNAL_SITE / "policy.toml").write_text(
        "evaluate-only = true\nmin-eval-records = 1\n"
    )
    settings = {
        "output-dir": str(tmp_path / "out"),
        "run-name": "t",
        "state-root": str(tmp_path / "state"),
        "num-server-rounds": 2,
    }
    grid = InProcessGrid(
        client_app, [{"partition-id": i} for i in range(3)], tiny_user_config(data, **settings)
    )
    folder = RunFolder(run_federation(grid, tiny_run(data, **settings)))
    history = folder.read_history()
    assert [h.round for h in history] == [1, 2] and folder.read_summary().status == "completed"
    with (data / EXTERNAL_SITE / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        records = sum(1 for _ in csv.DictReader(fh))
    for line in history:
        external = line.sites[EXTERNAL_SITE]
        assert external.train is None and "evaluate-only" in line.refusals[EXTERNAL_SITE]
        assert external.evaluate is not None and external.evaluate[R.EXTERNAL] == 1.0
        assert external.evaluate[R.NUM_EXAMPLES] == records  # every record, not a split
        training = {n: s.evaluate for n, s in line.sites.items() if n != EXTERNAL_SITE}
        assert all(m is not None and m[R.EXTERNAL] == 0.0 for m in training.values())
        a = line.aggregate or {}
        # the researcher's sites release exactly: the pooled AUROC is their weighted mean alone
        weights = {n: m[R.NUM_EXAMPLES] for n, m in training.items() if m}
        mean = sum(training[n][R.AUROC] * w for n, w in weights.items()) / sum(weights.values())
        assert a[R.AUROC] == pytest.approx(mean, abs=1e-6)
        # the external site's noisy counts are pooled apart: one site, its own released AUROC
        assert a[f"{R.EXTERNAL}-{R.AUROC}"] == pytest.approx(external.evaluate[R.AUROC], abs=1e-3)
        assert a[f"{R.EXTERNAL}-{R.NUM_EXAMPLES}"] == records
    receipts = read_receipts(tmp_path / "state" / EXTERNAL_SITE / "state")
    assert [(r.round, r.kind) for r in receipts] == [(1, "evaluate"), (2, "evaluate")]
    assert receipts[-1].epsilon is not None and receipts[-1].epsilon <= 8.0 * (1 + 1e-6)


def _policy(folder: Path, text: str) -> SitePolicy:
    path = folder / "policy.toml"
    path.write_text(text)
    return load_policy(path)
