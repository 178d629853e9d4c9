"""Run some rounds of one simulated hospital's ClientApp in this process, then exit.

Used by the restart test: `python -m tests.site_process DATA STATE RUN_ID TOTAL ROUND [ROUND ...]`
prints one JSON line per round with the epsilon the site reported.
"""

from __future__ import annotations

import json
import sys

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
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from tests.conftest import round_config, tiny_run, tiny_user_config


def main(data_root: str, state_root: str, run_id: int, total: int, rounds: list[int]) -> None:
    """Send train messages for `rounds` to a fresh ClientApp context (a new process each time)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    overrides = {"state-root": state_root, "accountant": "rdp", "num-server-rounds": total}
    run = tiny_run(data_root, **overrides)
    model = build_model(run.model)
    arrays = ArrayRecord(trainable_state(model))
    ctx = Context(
        run_id=run_id,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config=tiny_user_config(data_root, **overrides),
    )
    for r in rounds:
        config = ConfigRecord(
            {**round_config(frozen_fingerprint(model), str(run_id)), R.SERVER_ROUND: r}
        )
        msg = Message(
            RecordDict({R.ARRAYS: arrays, R.CONFIG: config}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        reply = app(msg, ctx)
        if reply.has_error():
            print(json.dumps({"round": r, "error": reply.error.reason}), flush=True)
            continue
        sent = reply.content[R.ARRAYS]  # the parameters the site trained; keep the rest
        arrays = ArrayRecord({k: sent[k] if k in sent else arrays[k] for k in arrays})
        print(json.dumps({"round": r, "epsilon": reply.content[R.METRICS][R.EPSILON]}), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(x) for x in sys.argv[5:]]
    )
