"""The simulation's apps, without Ray: run config injection and simulated hospitals' policies."""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Context, RecordDict

from common import protocol as R
from common.runfolder import RunFolder
from simulations.inprocess import InProcessGrid
from simulations.run import make_apps
from tests.conftest import tiny_user_config


def test_no_dp_applies_to_hospitals_without_a_policy_of_their_own(
    demo_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for i in range(2):
        shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
    (data / "hospital-1" / "policy.toml").write_text("require-dp = true\n")
    cfg = tiny_user_config(
        data,
        dp=False,
        **{
            "output-dir": str(tmp_path / "out"),
            "run-name": "x",
            "min-nodes": 1,
            "num-server-rounds": 1,
        },
    )
    server, client = make_apps(cfg)
    grid = InProcessGrid(client, [{"partition-id": i} for i in range(2)], run_config={})
    server(
        grid,
        Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
    )  # the apps carry their own run config
    out = RunFolder(tmp_path / "out" / "x")
    assert out.read_summary().status == "completed"
    (line,) = out.read_history()
    assert line.sites["hospital-0"].train[R.EPSILON] is None  # trained without DP: no guarantee
    assert "require-dp = true" in line.refusals["hospital-1"]  # its own policy wins
