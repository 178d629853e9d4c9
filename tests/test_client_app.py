"""The ClientApp contract: what a site receives and exactly what it sends back."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from client.evaluation import evaluate_round
from client.rounds import train_round
from client.state import SiteState
from common import protocol as R
from common.errors import Kind
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from common.protocol import update_digest
from tests.conftest import hospital, request, round_config, tiny_run, tiny_user_config


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def server_side(demo_root: Path, **overrides: object) -> tuple[ArrayRecord, ConfigRecord, str]:
    """What the ServerApp would send: initial trainable arrays and the round config."""
    run = tiny_run(demo_root, **overrides)
    model = build_model(run.model)
    fingerprint = frozen_fingerprint(model)
    return ArrayRecord(trainable_state(model)), round_config(fingerprint, "run-1"), fingerprint


def message(arrays: ArrayRecord, config: ConfigRecord, kind: str, server_round: int = 1) -> Message:
    config = ConfigRecord({**config, R.SERVER_ROUND: server_round})
    return Message(
        RecordDict({R.ARRAYS: arrays, R.CONFIG: config}), dst_node_id=7, message_type=kind
    )


def context(demo_root: Path, state_root: Path, partition: int = 0, **overrides: object) -> Context:
    return Context(
        run_id=11,
        node_id=7,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config=tiny_user_config(demo_root, state_root=str(state_root), **overrides),
    )


def test_train_reply_holds_exactly_the_trainable_set_and_fixed_metrics(
    demo_root: Path, tmp_path: Path
) -> None:
    arrays, config, _ = server_side(demo_root)
    ctx = context(demo_root, tmp_path)
    reply = app(message(arrays, config, MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) == {R.ARRAYS, R.UPDATE, R.METRICS, R.SITE}
    sent = content[R.ARRAYS]
    # every demo row has an image and a report: the missing-modality placeholders are not trained
    untrained = list(content[R.UPDATE][R.UNTRAINED])
    assert untrained == ["fusion.missing_image.table.weight", "fusion.missing_text.table.weight"]
    # the others: same names, same order as the server's
    assert list(sent.keys()) == [n for n in arrays if n not in untrained]
    for name in sent:
        assert sent[name].shape == arrays[name].shape and sent[name].dtype == arrays[name].dtype
    assert set(content[R.METRICS].keys()) == set(R.TRAIN_METRICS)
    assert dict(content[R.SITE]) == {R.SITE_NAME: "hospital-0"}
    first = content[R.METRICS][R.EPSILON]
    assert 0 < first < 8.0
    state_dir = tmp_path / "hospital-0" / "state"
    assert load_ledger(state_dir).run("run-1").rounds == (1,)  # charged before the reply
    # the receipt's hash is the hash of exactly the arrays sent
    assert read_receipts(state_dir)[0].update_sha256 == update_digest(
        {k: v.numpy() for k, v in sent.items()}
    )

    second = app(message(arrays, config, MessageType.TRAIN, server_round=2), ctx)
    assert second.content[R.METRICS][R.EPSILON] > first  # the ledger carried over the round
    assert [r.round for r in read_receipts(state_dir)] == [1, 2]


def test_without_dp_the_metric_keys_are_the_same(demo_root: Path, tmp_path: Path) -> None:
    arrays, config, _ = server_side(demo_root, dp=False)
    policy = tmp_path / "policy.toml"
    policy.write_text("require-dp = false\n")
    ctx = context(demo_root, tmp_path, dp=False)
    ctx.node_config["policy"] = str(policy)
    reply = app(message(arrays, config, MessageType.TRAIN), ctx)
    assert set(reply.content[R.METRICS].keys()) == set(R.TRAIN_METRICS)
    assert reply.content[R.METRICS][R.EPSILON] == float("inf")


def test_evaluate_reply(demo_root: Path, tmp_path: Path) -> None:
    arrays, config, _ = server_side(demo_root)
    reply = app(message(arrays, config, MessageType.EVALUATE), context(demo_root, tmp_path))
    assert set(reply.content.keys()) == {R.METRICS, R.COUNTS, R.SITE}
    metrics = reply.content[R.METRICS]
    assert set(metrics.keys()) == set(R.EVAL_METRICS)
    assert metrics[R.NUM_EXAMPLES] > 0 and 0.0 <= metrics[R.AUROC] <= 1.0


def test_missing_data_folder_is_an_error_reply_naming_the_site(
    demo_root: Path, tmp_path: Path
) -> None:
    arrays, config, _ = server_side(demo_root)
    reply = app(
        message(arrays, config, MessageType.TRAIN), context(demo_root, tmp_path, partition=9)
    )
    assert reply.has_error()
    assert (
        "site 'hospital-9'" in reply.error.reason and "no such file or folder" in reply.error.reason
    )
    assert reply.error.code == R.ERROR_CODES[Kind.BAD_DATA]


def test_frozen_part_mismatch_is_refused(demo_root: Path, tmp_path: Path) -> None:
    arrays, config, _ = server_side(demo_root)
    config = ConfigRecord({**config, R.FROZEN_FINGERPRINT: "0" * 64})
    reply = app(message(arrays, config, MessageType.TRAIN), context(demo_root, tmp_path))
    assert reply.has_error() and "differs from the server's" in reply.error.reason
    assert reply.error.code == R.ERROR_CODES[Kind.CONFIGURATION]


def test_bad_run_config_is_an_error_reply(demo_root: Path, tmp_path: Path) -> None:
    arrays, config, _ = server_side(demo_root)
    ctx = context(demo_root, tmp_path)
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config=ctx.node_config,
        state=RecordDict(),
        run_config={**ctx.run_config, "batch-sise": 8},
    )
    reply = app(message(arrays, config, MessageType.TRAIN), ctx)
    assert reply.has_error() and "did you mean 'batch-size'" in reply.error.reason


def test_a_round_asked_again_gets_the_same_update_and_costs_nothing(
    demo_root: Path, tmp_path: Path
) -> None:
    """A resumed server asks a round again: same global parameters -> the update already sent."""
    arrays, config, _ = server_side(demo_root)
    first = app(message(arrays, config, MessageType.TRAIN), context(demo_root, tmp_path))
    again = app(message(arrays, config, MessageType.TRAIN), context(demo_root, tmp_path))
    assert not again.has_error(), again.error
    assert list(again.content[R.ARRAYS].keys()) == list(first.content[R.ARRAYS].keys())
    assert list(again.content[R.UPDATE][R.UNTRAINED]) == list(first.content[R.UPDATE][R.UNTRAINED])
    for name in first.content[R.ARRAYS]:
        np.testing.assert_array_equal(
            again.content[R.ARRAYS][name].numpy(), first.content[R.ARRAYS][name].numpy()
        )
    assert again.content[R.METRICS][R.EPSILON] == first.content[R.METRICS][R.EPSILON]
    state_dir = tmp_path / "hospital-0" / "state"
    assert load_ledger(state_dir).run("run-1").rounds == (1,)
    assert len(read_receipts(state_dir)) == 1

    # asked again from other global parameters: that is new training, charged as such
    moved = ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in arrays.items()})
    third = app(message(moved, config, MessageType.TRAIN), context(demo_root, tmp_path))
    assert third.content[R.METRICS][R.EPSILON] > first.content[R.METRICS][R.EPSILON]
    assert load_ledger(state_dir).run("run-1").rounds == (1, 1)
    assert len(read_receipts(state_dir)) == 2


def test_the_sites_log_says_what_each_round_spent_and_what_is_left(
    demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tiny_run(demo_root, num_server_rounds=2, local_steps=2)
    state = SiteState(hospital(demo_root, tmp_path, 0))  # a deployed site: DP, its default cap 8
    parameters = trainable_state(state.bundle(run.model).model)
    asked = [request(state, run, r, parameters, flower_run_id=17) for r in (1, 2)]
    with caplog.at_level(logging.INFO, logger="client.rounds"):
        first = train_round(state, run, asked[0])
        evaluate_round(state, run, asked[0])  # its noisy counts: a charged release
        second = train_round(state, run, asked[1])
    receipts = read_receipts(state.site.state_dir)
    assert [(r.round, r.kind) for r in receipts] == [(1, "train"), (1, "evaluate"), (2, "train")]
    totals = [r.epsilon for r in receipts]
    assert totals[2] == second.receipt.epsilon and totals[0] == first.receipt.epsilon
    lines = [r.getMessage() for r in caplog.records if " this run (cap " in r.getMessage()]
    assert len(lines) == 3, lines
    steps = [first.receipt.steps, None, second.receipt.steps]
    for line, receipt, before, count in zip(
        lines, receipts, [0.0, *totals[:2]], steps, strict=True
    ):
        assert line.startswith(f"hospital-0: run run-1 (Flower run 17) round {receipt.round}: ")
        what = f"{count} DP-SGD steps" if count else "evaluation counts released"
        unit = "round" if count else "release"
        assert f": {what}; epsilon {receipt.epsilon - before:.3f} this {unit}, " in line
        assert f"{receipt.epsilon:.3f} this run (cap 8)" in line
        assert f"{8.0 - receipt.epsilon:.3f} left" in line  # a fresh site: the run is all its spend
