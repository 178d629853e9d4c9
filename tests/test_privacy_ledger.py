"""The ledger on disk: a restart cannot reset a site's spend, and nothing leaves unrecorded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from common import protocol as R
from common.errors import Kind
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from common.privacy.accounting import epsilon_from_history
from common.privacy.ledger import LEDGER_FILE, LedgerError, load_ledger
from common.privacy.receipts import read_receipts
from tests.conftest import hospital, request, round_config, tiny_run, tiny_user_config

ROOT = Path(__file__).resolve().parent.parent


def site_process(demo_root: Path, state: Path, *rounds: int) -> list[dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.site_process",
            str(demo_root),
            str(state),
            "4242",
            "3",
            *map(str, rounds),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # two fresh processes
def test_a_restarted_site_continues_from_its_recorded_spend(
    demo_root: Path, tmp_path: Path
) -> None:
    first = site_process(demo_root, tmp_path, 1, 2)  # a site process trains rounds 1 and 2 ...
    (third,) = site_process(demo_root, tmp_path, 3)  # ... stops; a new process trains round 3
    eps = [first[0]["epsilon"], first[1]["epsilon"], third["epsilon"]]
    assert eps[0] < eps[1] < eps[2] <= 8.0 + 1e-6
    entry = load_ledger(tmp_path / "hospital-0" / "state").run("4242")
    assert entry.rounds == (1, 2, 3)
    ((sigma, q, steps),) = entry.account.history  # one noise level for the whole run
    assert steps == 3 * read_receipts(tmp_path / "hospital-0" / "state")[0].steps
    assert eps[2] == pytest.approx(
        epsilon_from_history([(sigma, q, steps)], delta=1e-5, accountant="rdp"), abs=1e-9
    )
    assert eps[2] > 7.5  # round 3 was accounted on top of rounds 1-2, not from zero


def test_nothing_is_sent_when_the_ledger_cannot_be_written(demo_root: Path, tmp_path: Path) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 0, 1
    blocker = tmp_path / "state-is-a-file"
    blocker.write_text("not a folder")
    run = tiny_run(demo_root)
    model = build_model(run.model)
    config = ConfigRecord({**round_config(frozen_fingerprint(model), "run-5"), R.SERVER_ROUND: 1})
    msg = Message(
        RecordDict({R.ARRAYS: ArrayRecord(trainable_state(model)), R.CONFIG: config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(
        run_id=5,
        node_id=1,
        node_config={"manifest": str(demo_root / "hospital-0"), "state-dir": str(blocker / "sub")},
        state=RecordDict(),
        run_config=tiny_user_config(demo_root),
    )
    reply = app(msg, ctx)
    assert reply.has_error()
    assert reply.error.code == R.ERROR_CODES[Kind.FAILURE] and "state-folder" in reply.error.reason
    assert str(blocker) not in reply.error.reason  # the detail, with its path, stays at the site
    assert not reply.has_content()  # no parameters left the site


def test_an_unreadable_ledger_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{ truncated")
    with pytest.raises(LedgerError, match="restore it from a backup; do not delete it"):
        load_ledger(tmp_path)


@pytest.mark.slow
def test_data_changed_mid_run_is_refused(demo_root: Path, tmp_path: Path) -> None:
    """The same process notices the change: the dataset version is recomputed every round."""
    import shutil

    from client.rounds import train_round
    from client.state import SiteState
    from common.errors import Refusal

    shutil.copytree(demo_root / "hospital-2", tmp_path / "h2")
    run = tiny_run(demo_root, num_server_rounds=2)
    state = SiteState(hospital(tmp_path, tmp_path / "state", 2, manifest=tmp_path / "h2"))
    train_round(state, run, request(state, run, 1, run_key="r"))
    manifest = tmp_path / "h2" / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns, first = reader.fieldnames or [], next(reader)
    with manifest.open("a", newline="", encoding="utf-8") as fh:  # one more row: a new patient
        csv.DictWriter(fh, columns).writerow({**first, "patient_id": "a-new-patient"})
    with pytest.raises(Refusal, match="changed during this run") as refused:
        train_round(state, run, request(state, run, 2, run_key="r"))
    assert refused.value.reason == "data-changed"
    assert [r.round for r in read_receipts(state.site.state_dir)] == [1]
