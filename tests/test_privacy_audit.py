"""Audit of everything that leaves a site during a simulated run.

Every reply is captured as it leaves the ClientApp. Allowed: the trainable parameters (exact
names, shapes, float32), the fixed scalar metrics of common.protocol, the site's own name, and,
instead of all of that, an error reason naming the site. Nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client.app import app as client_app
from common import protocol as R
from common.model.fusion_model import build_model
from common.model.trainable import trainable_state
from common.runfolder import RunFolder
from common.training.score_counts import ScoreCounts
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config


@pytest.mark.slow
def test_sites_send_only_trainable_arrays_and_whitelisted_scalars(
    demo_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for i in range(2):
        shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
    (data / "hospital-1" / "policy.toml").write_text(  # refuses round 2
        "max-rounds = 1\nmin-eval-records = 1\n"
    )
    settings = {
        "output-dir": str(tmp_path / "out"),
        "run-name": "audit",
        "min-nodes": 1,
        "state-root": str(tmp_path / "state"),
        "num-server-rounds": 2,
    }
    sent: list[tuple[int, Message]] = []
    names_sent: dict[int, list[str]] = {}  # id(reply) -> its array names as they left the site

    def tap(node: int, msg: Message) -> None:
        # the server later completes a partial update inside the same Message object
        if not msg.has_error() and R.ARRAYS in msg.content:
            names_sent[id(msg)] = list(msg.content[R.ARRAYS].keys())
        sent.append((node, msg))

    grid = InProcessGrid(
        client_app,
        [{"partition-id": i} for i in range(2)],
        tiny_user_config(data, **settings),
        tap=tap,
    )
    out = run_federation(grid, tiny_run(data, **settings))
    assert RunFolder(out).read_summary().status == "completed"

    expected = {k: v.shape for k, v in trainable_state(build_model(tiny_run(data).model)).items()}
    names = {1: "hospital-0", 2: "hospital-1"}
    kinds = {"train": 0, "evaluate": 0, "error": 0}
    for node, msg in sent:
        if msg.has_error():
            kinds["error"] += 1
            assert not msg.has_content()
            assert msg.error.reason.startswith(f"site '{names[node]}': ")
            continue
        content = msg.content
        assert set(content.keys()) <= {R.ARRAYS, R.UPDATE, R.METRICS, R.COUNTS, R.SITE}
        assert dict(content[R.SITE]) == {R.SITE_NAME: names[node]}
        metrics = dict(content[R.METRICS])
        assert all(
            type(v) in (int, float) for v in metrics.values()
        )  # scalars: no per-sample lists
        if R.ARRAYS in content:
            kinds["train"] += 1
            assert set(metrics) == set(R.TRAIN_METRICS)
            assert len(content.config_records) == 2  # the site's name and the untrained names
            untrained = list(content[R.UPDATE][R.UNTRAINED])
            assert set(untrained) <= set(expected)  # parameter names only: nothing else rides along
            assert names_sent[id(msg)] == [n for n in expected if n not in untrained]
            arrays = content[R.ARRAYS]
            for name, array in arrays.items():
                value = array.numpy()
                assert value.shape == tuple(expected[name]) and value.dtype == np.float32
        else:
            kinds["evaluate"] += 1
            assert set(metrics) == set(R.EVAL_METRICS) and set(content.array_records) == {R.COUNTS}
            assert len(content.config_records) == 1
            # the score counts only: fixed views of fixed shapes, whatever the site holds
            shapes = ScoreCounts.shapes(3)
            released = {k: tuple(v.shape) for k, v in content[R.COUNTS].items()}
            assert released in [
                {f"{view}/{name}": shape for view in views for name, shape in shapes.items()}
                for views in (("lacking", "both"), ("lacking", "both", "image", "text"))
            ]
    assert kinds == {"train": 3, "evaluate": 4, "error": 1}  # hospital-1 refused round 2
