"""The SuperLink crashes mid-run and restarts with its `--database`: what happens, on loopback.

One SuperLink (TLS, SuperNode authentication, `--database <file>`) and two hospitals (SuperNode in
process isolation + `fedfusion node`). A 3-round DP run is under way; while the sites train
round 2 the SuperLink and its ServerApp are killed (SIGKILL: a crash of the coordinator's host)
and the SuperLink is started again on the same database. What flwr 1.42 does, checked here:
- the run does **not** continue: `flwr run` fails; the restarted SuperLink lists the run as
  running until the dead ServerApp's heartbeat expires, then as `finished:failed` (no SuperLink
  starts a ServerApp again);
- the registrations survive: both SuperNodes reconnect on their own, nobody registers again;
- the coordinator resumes with FedFusion's own path (`flwr run` with the same `run-name`): the new
  Flower run continues after round 1, the sites recognise round 2 and send the update they
  already sent, so **no site is charged twice** (one receipt per round, ledger and receipts agree).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.privacy.audit import audit
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from simulations.demo_data import write_demo_hospitals
from simulations.loopback import CONNECTION, LoopbackFederation, Started, flwr_json

pytestmark = pytest.mark.slow  # about 2 min: real processes, two runs

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = ("hospital-a", "hospital-b")
POLICY = 'max-epsilon = 8.0\nbudget-scope = "run"\n'
EPOCHS = 3  # uncached epochs: round 2 lasts long enough to kill the SuperLink during it
RUN = (
    f"preset='tiny' accountant='rdp' round-timeout=120.0 num-server-rounds=3 "
    f"local-steps=0 local-epochs={EPOCHS} feature-cache=false fraction-evaluate=0.0"
)
TIMEOUT = 240.0


@pytest.fixture
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> LoopbackFederation:
    """SuperLink with a database + 2 registered hospitals over TLS."""
    fed = LoopbackFederation(tmp_path, ROOT, database=tmp_path / "superlink.db")
    request.addfinalizer(fed.stop)
    manifests = write_demo_hospitals(tmp_path / "data", len(HOSPITALS), seed=0, size_scale=0.1)
    fed.start(dict(zip(HOSPITALS, manifests, strict=True)), dict.fromkeys(HOSPITALS, POLICY))
    return fed


def _flower_run_id(run: Started) -> int:
    found = re.search(r"Successfully started run (\d+)", run.log.read_text())
    assert found, run.log.read_text()
    return int(found.group(1))


def test_a_superlink_restart_ends_the_run_and_the_resumed_run_charges_no_site_twice(
    federation: LoopbackFederation,
) -> None:
    fed = federation
    offsets = {n: s.log.stat().st_size for n, s in fed.nodes.items()}
    first = fed.submit("restart", RUN)
    training = re.compile(rf"round 2 train epoch 1/{EPOCHS}")
    fed.procs.wait_until(
        "both sites training round 2",
        lambda: all(
            training.search(s.log.read_text(errors="replace")[offsets[n] :])
            for n, s in fed.nodes.items()
        ),
        TIMEOUT,
        [first, *fed.nodes.values()],
    )
    fed.kill_superlink()
    assert fed.procs.wait_exit(first, 60) != 0  # flwr run loses its SuperLink
    first_id = _flower_run_id(first)

    fed.start_superlink("superlink-restarted")  # the same --database
    fed.procs.wait_until(
        "both SuperNodes back online, without registering again",
        lambda: len(fed.online_nodes()) == len(HOSPITALS),
        120,
        [fed.superlink, *fed.nodes.values()],
    )
    folder = RunFolder(fed.output_dir / "restart")
    assert [h.round for h in folder.read_history()] == [1]  # round 2 was never recorded
    resumed = fed.submit("restart", RUN)  # FedFusion's resume: same run-name, same settings
    folder = RunFolder(fed.finish(resumed, "restart", TIMEOUT))
    assert _flower_run_id(resumed) != first_id
    history = folder.read_history()
    assert [h.round for h in history] == [1, 2, 3] and folder.read_summary().status == "completed"
    run_key = folder.read_settings().run_key
    for name, node in fed.nodes.items():
        receipts = [r for r in read_receipts(fed.state_dirs[name]) if r.run_id == run_key]
        assert [r.round for r in receipts] == [1, 2, 3]  # round 2 charged once
        assert [h.sites[name].update_sha256 for h in history] == [r.update_sha256 for r in receipts]
        assert receipts[-1].epsilon <= 8.0 + 1e-9 and audit(fed.state_dirs[name]).ok
        assert "round 2 asked again from the same global parameters" in node.log.read_text()
    # the restarted SuperLink never continued the first run: it lists it as failed once the
    # dead ServerApp's heartbeat has expired (2 x 30 s after the crash)
    fed.procs.wait_until(
        "the first run marked failed",
        lambda: _status(fed, first_id) == "finished:failed",
        120,
        [fed.superlink],
    )


def _status(fed: LoopbackFederation, run_id: int) -> str:
    (listed,) = flwr_json(["list", CONNECTION, "--run-id", str(run_id)], fed.cli_env, fed.root)[
        "runs"
    ]
    return str(listed["status"])
