"""Privacy receipts and `fedfusion privacy report`: re-derived spend, tampering detected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.rounds import train_round
from client.state import SiteState
from common.model.trainable import trainable_state
from common.privacy.audit import audit
from common.privacy.receipts import RECEIPTS_FILE, read_receipts
from tests.conftest import hospital, request, tiny_run
from tools.cli import main as fedfusion

# its module-scoped fixture is built once: every test of the module on one xdist worker
pytestmark = pytest.mark.xdist_group("test_privacy_receipts")


@pytest.fixture(scope="module")
def trained_state(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's state folder after two DP rounds of one run (read-only: copy it to modify)."""
    run = tiny_run(demo_root, accountant="rdp", num_server_rounds=2)
    site = SiteState(hospital(demo_root, tmp_path_factory.mktemp("state")))
    parameters = trainable_state(site.bundle(run.model).model)
    for r in (1, 2):
        out = train_round(site, run, request(site, run, r, parameters, run_key="run-7"))
        parameters = {**parameters, **out.state}
    return site.site.state_dir


@pytest.fixture()
def state_dir(trained_state: Path, tmp_path: Path) -> Path:
    """A private copy of the trained state folder."""
    return Path(shutil.copytree(trained_state, tmp_path / "state"))


def test_receipts_hold_what_the_issue_asks(state_dir: Path) -> None:
    first, second = read_receipts(state_dir)
    assert (first.run_id, first.round, second.round) == ("run-7", 1, 2)
    assert first.accountant == "rdp" and first.delta == 1e-5 and first.steps > 0
    assert 0 < first.epsilon < second.epsilon <= 8.0
    assert len(first.update_sha256) == 64 and first.update_sha256 != second.update_sha256
    assert len(first.dataset_sha256) == 64 and first.dataset_sha256 == second.dataset_sha256


def test_report_re_derives_every_epsilon(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = audit(state_dir)
    assert result.ok and len(result.rows) == 2
    assert fedfusion(["privacy", "report", str(state_dir)]) == 0
    out = capsys.readouterr().out
    assert "All receipts agree" in out and out.count(" ok") == 2


def test_report_flags_an_altered_receipt(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = state_dir / RECEIPTS_FILE
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["epsilon"] = edited["epsilon"] / 2  # someone claims a smaller spend
    path.write_text("\n".join([lines[0], json.dumps(edited)]) + "\n")
    assert fedfusion(["privacy", "report", str(state_dir)]) == 1
    assert "MISMATCH" in capsys.readouterr().out

    path.write_text(lines[0] + "\n")  # a receipt removed
    assert fedfusion(["privacy", "report", str(state_dir)]) == 1
    assert "the ledger lists rounds [1, 2], the receipts [1]" in capsys.readouterr().out


def test_check_policy_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("max-epsilon = 4\n")
    bad.write_text("max-epsilon = 0\n")
    assert fedfusion(["privacy", "check-policy", str(good)]) == 0
    out = capsys.readouterr().out
    assert "max-epsilon = 4.0" in out and "evaluation-share = 0.1" in out
    assert "warning" not in out
    good.write_text("exact-metrics = true\n")
    assert fedfusion(["privacy", "check-policy", str(good)]) == 0
    assert "outside the DP guarantee" in capsys.readouterr().out
    assert fedfusion(["privacy", "check-policy", str(bad)]) == 2
    assert "max-epsilon must be > 0" in capsys.readouterr().err
