"""A whole federation in one process (ServerApp + 3 hospitals, in-process grid, no DP), then exit.

Used by the crash test: `python -m tests.federation_process DATA OUT RUN_NAME ROUNDS` runs (or
resumes) the run `OUT/RUN_NAME`; the test kills this process mid-run and starts it again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import evaluate_reply, train_reply
from server.app import run_federation
from tests.conftest import tiny_run, tiny_user_config
from tests.inprocess import InProcessGrid

SITES = 3


def settings(out: Path, run_name: str, rounds: int) -> dict[str, object]:
    """The run config overrides of the crash test's runs."""
    return {"output-dir": str(out), "run-name": run_name, "state-root": str(out / "state"),
            "dp": False, "num-server-rounds": rounds}


def client_app(policy: Path) -> ClientApp:
    """The real ClientApp with a default policy that allows training without DP."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, context.run_config, policy)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(msg, context, context.run_config, policy)

    return app


def main(data_root: str, out: str, run_name: str, rounds: int) -> Path:
    """Run the federation; return the run folder."""
    overrides = settings(Path(out), run_name, rounds)
    policy = Path(out) / "no-dp-policy.toml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text("require-dp = false\n")
    grid = InProcessGrid(client_app(policy),
                         [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)],
                         tiny_user_config(data_root, **overrides))
    return run_federation(grid, tiny_run(data_root, **overrides))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)  # flwr has already set up the root logger
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
