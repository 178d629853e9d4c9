"""A whole federation in one process (ServerApp + 3 hospitals, in-process grid, no DP), then exit.

Used by the crash test: `python -m tests.federation_process DATA OUT RUN_NAME ROUNDS` runs (or
resumes) the run `OUT/RUN_NAME`; the test kills this process mid-run and starts it again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from client.app import app as client_app
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config

SITES = 3


def settings(out: Path, run_name: str, rounds: int) -> dict[str, object]:
    """The run config overrides of the crash test's runs."""
    return {
        "output-dir": str(out),
        "run-name": run_name,
        "state-root": str(out / "state"),
        "dp": False,
        "num-server-rounds": rounds,
    }


def main(data_root: str, out: str, run_name: str, rounds: int) -> Path:
    """Run the federation; return the run folder."""
    overrides = settings(Path(out), run_name, rounds)
    grid = InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)],
        tiny_user_config(data_root, **overrides),
    )
    return run_federation(grid, tiny_run(data_root, **overrides))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)  # flwr has already set up the root logger
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
