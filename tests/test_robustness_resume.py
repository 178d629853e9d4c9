"""Resume: the server process is killed mid-run (a real SIGKILL) and started again.

Without DP, training is seeded by round, so a resumed run must end with the model of an
uninterrupted one; sites answer a round asked again with the update they already sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.model.checkpoint import load_tensors
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from server.resume import ResumeError, open_run
from tests import federation_process
from tests.conftest import tiny_run

ROOT = Path(__file__).resolve().parent.parent


def _start(demo_root: Path, out: Path, name: str, rounds: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.federation_process",
            str(demo_root),
            str(out),
            name,
            str(rounds),
        ],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_for_rounds(
    folder: Path, rounds: int, proc: subprocess.Popen, log: Path, limit: float = 180.0
) -> None:
    deadline = time.monotonic() + limit
    while len(RunFolder(folder).read_history()) < rounds:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no round {rounds} in {folder}; log tail:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_server_resumes_and_ends_with_the_uninterrupted_model(
    demo_root: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    folder = tmp_path / "resumed"
    first = _start(demo_root, tmp_path, "resumed", 3, log)
    _wait_for_rounds(folder, 1, first, log)
    os.killpg(first.pid, signal.SIGKILL)  # mid-run: round 2 is under way
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    finished_before = len(RunFolder(folder).read_history())
    assert finished_before < 3 and RunFolder(folder).read_summary() is None

    second = _start(demo_root, tmp_path, "resumed", 3, log)
    assert second.wait(300) == 0, log.read_text()[-3000:]
    history = RunFolder(folder).read_history()
    assert [h.round for h in history] == [1, 2, 3]
    assert RunFolder(folder).read_summary().status == "completed"
    assert f"resuming run resumed after round {finished_before} of 3" in log.read_text()

    straight = federation_process.main(str(demo_root), str(tmp_path), "straight", 3)
    resumed_model, straight_model = (
        load_tensors(f / "model.safetensors") for f in (folder, straight)
    )
    for name, value in straight_model.items():
        np.testing.assert_allclose(resumed_model[name].numpy(), value.numpy(), rtol=0, atol=1e-6)

    # every site trained and was charged each round once, though round 2 may have been asked twice
    run_key = RunFolder(folder).read_settings().run_key
    for site in ("hospital-0", "hospital-1", "hospital-2"):
        state = tmp_path / "state" / site / "state"
        assert load_ledger(state).run(run_key).rounds == (1, 2, 3)
        assert [r.round for r in read_receipts(state) if r.run_id == run_key] == [1, 2, 3]


def test_a_run_resumes_only_with_its_own_settings(demo_root: Path, tmp_path: Path) -> None:
    overrides = federation_process.settings(tmp_path, "r", 3)
    start = open_run(tiny_run(demo_root, **overrides))
    assert start.finished_round == 0 and len(start.run_key) == 32
    with pytest.raises(ResumeError, match=r"learning-rate: 0.1 then, 0.5 now"):
        open_run(tiny_run(demo_root, **overrides, **{"learning-rate": 0.5}))
    again = open_run(tiny_run(demo_root, **overrides, **{"round-timeout": 60.0}))  # may change
    assert again.run_key == start.run_key and again.finished_round == 0


def test_a_completed_run_is_not_resumed(demo_root: Path, tmp_path: Path) -> None:
    folder = federation_process.main(str(demo_root), str(tmp_path), "done", 1)
    with pytest.raises(ResumeError, match="already completed"):
        open_run(tiny_run(demo_root, **federation_process.settings(tmp_path, "done", 1)))
    assert [h.round for h in RunFolder(folder).read_history()] == [1]


@pytest.mark.slow
def test_a_new_flower_run_resuming_a_round_the_sites_trained_charges_them_once(
    demo_root: Path, tmp_path: Path
) -> None:
    """The coordinator died after the sites trained round 2, before it committed the round.

    As after a SuperLink restart, the resumed run is a new Flower run: the sites recognise round 2
    (same run key, same global parameters) and send the update they sent, charging nothing.
    """
    from client.app import app as client_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid
    from tests.conftest import tiny_user_config

    settings = {
        "output-dir": str(tmp_path),
        "run-name": "r",
        "state-root": str(tmp_path / "state"),
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "local-epochs": 1,
    }
    config = tiny_user_config(demo_root, **settings)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    first = RunFolder(
        run_federation(InProcessGrid(client_app, nodes, config), tiny_run(demo_root, **settings))
    )
    sent_first = {name: site.update_sha256 for name, site in first.read_history()[1].sites.items()}
    # what the coordinator had on disk when it died: round 1 finished, round 2 not yet recorded
    first.rewrite_history(first.read_history()[:1])
    for name in ("round-002.safetensors", "summary.json", "model.safetensors", "model.json"):
        (first.path / name).unlink(missing_ok=True)
    epsilon = {
        n: load_ledger(tmp_path / "state" / n / "state").run(first.read_settings().run_key)
        for n in sent_first
    }
    resumed = RunFolder(
        run_federation(InProcessGrid(client_app, nodes, config), tiny_run(demo_root, **settings))
    )
    line = resumed.read_history()[1]
    assert resumed.read_summary().status == "completed"
    run_key = resumed.read_settings().run_key
    for name, sha in sent_first.items():
        state = tmp_path / "state" / name / "state"
        assert line.sites[name].update_sha256 == sha  # the same bytes again
        assert [r.round for r in read_receipts(state) if r.run_id == run_key] == [1, 2]
        assert load_ledger(state).run(run_key).account == epsilon[name].account  # nothing new spent
