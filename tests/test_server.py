"""The ServerApp: FedAvg wiring, metric aggregation, history, checkpoints, failing sites.

Runs the real ServerApp and ClientApp in one process through an in-process Grid (no Ray).
"""

from __future__ import annotations

import csv
import logging
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.app import app as client_app
from common import protocol as R
from common.model.checkpoint import load_model, load_tensors
from common.model.trainable import trainable_state
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from common.training.score_counts import ScoreCounts, count_scores, metrics_from_counts
from server import app as server_app
from server.app import RunStopped, run_federation
from server.evaluation import SiteCounts, pooled_metrics
from server.loop import exchange_in_turn
from server.resume import ResumeError
from server.strategy import weighted_means
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config


def test_aggregate_metrics_weights_by_examples_skips_nan_and_privacy() -> None:
    contents = [
        RecordDict(
            {
                R.METRICS: MetricRecord(
                    {R.NUM_EXAMPLES: n, R.LOSS: loss, R.AUROC: auc, R.EPSILON: eps}
                )
            }
        )
        for n, loss, auc, eps in [(10, 1.0, 0.8, 3.0), (30, 2.0, math.nan, 7.0)]
    ]
    agg = weighted_means(contents, R.NUM_EXAMPLES)
    assert set(agg.keys()) == {R.LOSS, R.AUROC}  # epsilon is never averaged
    assert agg[R.LOSS] == pytest.approx(np.average([1.0, 2.0], weights=[10, 30]))
    assert agg[R.AUROC] == pytest.approx(0.8)


def federation(data_root: Path, out: Path, sites: int, tap=None, **overrides: object):
    """An in-process grid of `sites` simulated hospitals and the run config, outputs in `out`."""
    settings = {
        "output-dir": str(out),
        "run-name": "t",
        "state-root": str(out / "state"),
        **overrides,
    }
    grid = InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": sites} for i in range(sites)],
        tiny_user_config(data_root, **settings),
        tap=tap,
    )
    return grid, tiny_run(data_root, **settings)


def test_rounds_are_averaged_recorded_and_checkpointed(demo_root: Path, tmp_path: Path) -> None:
    replies: list[Message] = []
    grid, run = federation(
        demo_root,
        tmp_path,
        2,
        tap=lambda node, msg: replies.append(msg),
        **{"num-server-rounds": 2},
    )
    out = run_federation(grid, run)
    folder = RunFolder(out)

    history = folder.read_history()
    assert [h.round for h in history] == [1, 2]
    for h in history:
        assert set(h.sites) == {"hospital-0", "hospital-1"}
        for site in h.sites.values():
            assert set(site.train) == set(R.TRAIN_METRICS)
            assert set(site.evaluate) == set(R.EVAL_METRICS)
            assert len(site.update_sha256) == 64 and site.node_id in (1, 2)
            assert 0 < site.train[R.EPSILON] <= 8.01
        assert set(h.aggregate) == {
            R.TRAIN_LOSS,
            R.LOSS,
            R.ACCURACY,
            R.AUROC,
            R.F1,
            *R.ABLATION_METRICS,
        }
        assert not h.failures and not h.refusals
    assert (
        history[1].sites["hospital-0"].train[R.EPSILON]
        > history[0].sites["hospital-0"].train[R.EPSILON]
    )
    # aggregates weight training loss by training size, validation metrics by validation size
    sites = history[1].sites.values()
    assert history[1].aggregate[R.TRAIN_LOSS] == pytest.approx(
        np.average(
            [s.train[R.TRAIN_LOSS] for s in sites], weights=[s.train[R.NUM_EXAMPLES] for s in sites]
        )
    )
    assert history[1].aggregate[R.LOSS] == pytest.approx(
        np.average(
            [s.evaluate[R.LOSS] for s in sites], weights=[s.evaluate[R.NUM_EXAMPLES] for s in sites]
        )
    )
    # simulated hospitals release exactly: every metric is the validation-weighted mean
    for key in (R.ACCURACY, R.AUROC, R.F1):
        assert history[1].aggregate[key] == pytest.approx(
            np.average(
                [s.evaluate[key] for s in sites],
                weights=[s.evaluate[R.NUM_EXAMPLES] for s in sites],
            )
        )
    assert all(s.train[R.NUM_EXAMPLES] > s.evaluate[R.NUM_EXAMPLES] for s in sites)

    # round 1's checkpoint is the num-examples-weighted mean of round 1's train replies
    train_1 = [m for m in replies[:4] if R.ARRAYS in m.content]
    weights = [m.content[R.METRICS][R.NUM_EXAMPLES] for m in train_1]
    saved = load_tensors(out / "round-001.safetensors")
    for name, value in saved.items():
        expected = np.average(
            [m.content[R.ARRAYS][name].numpy() for m in train_1], axis=0, weights=weights
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)

    # the server's hash of what it received equals the site's receipt of what it sent
    receipts = read_receipts(tmp_path / "state" / "hospital-0" / "state")
    assert [r.update_sha256 for r in receipts] == [
        h.sites["hospital-0"].update_sha256 for h in history
    ]
    assert folder.read_summary().status == "completed"

    # the final model reloads without Flower and carries round 2's parameters
    model = load_model(out)
    final = load_tensors(out / "round-002.safetensors")
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(value, final[name])


def test_each_round_is_evaluated_with_the_next_rounds_training_and_recorded_as_its_own(
    demo_root: Path, tmp_path: Path
) -> None:
    """Round r's aggregate is evaluated in round r + 1's exchange, just before its training, at
    every site, and the evaluation lands in round r's history line; the last round's alone."""
    asked: dict[str, tuple[str, int]] = {}  # message id: (type, server-round)
    replies: dict[tuple[str, int], list[Message]] = {}
    models: dict[int, dict[str, np.ndarray]] = {}  # server-round: the parameters evaluated

    def spy(msg: Message, context) -> Message:
        key = (msg.metadata.message_type, int(msg.content[R.CONFIG][R.SERVER_ROUND]))
        asked[msg.metadata.message_id] = key
        if key[0] == "evaluate":
            models[key[1]] = {k: v.numpy() for k, v in msg.content[R.ARRAYS].items()}
        replies.setdefault(key, []).append(reply := client_app(msg, context))
        return reply

    grid, run = federation(demo_root, tmp_path, 2, **{"num-server-rounds": 3})
    grid.client_app = spy
    exchanges: list[list[tuple[str, int]]] = []
    pull = grid.pull_messages

    def pulled(ids):
        got = list(pull(ids))
        exchanges.append([asked[m.metadata.reply_to_message_id] for m in got])
        return got

    grid.pull_messages = pulled
    out = run_federation(grid, run)
    assert exchanges == [  # every reply is in at the first pull on this grid
        [("train", 1)] * 2,
        [("evaluate", 1)] * 2 + [("train", 2)] * 2,
        [("evaluate", 2)] * 2 + [("train", 3)] * 2,
        [("evaluate", 3)] * 2,
    ]
    history = RunFolder(out).read_history()
    for line in history:
        sent = sorted(m.content[R.METRICS][R.AUROC] for m in replies[("evaluate", line.round)])
        assert sorted(s.evaluate[R.AUROC] for s in line.sites.values()) == sent
        checkpoint = load_tensors(out / f"round-{line.round:03d}.safetensors")
        for name, value in checkpoint.items():  # the evaluated model is the round's aggregate
            np.testing.assert_array_equal(models[line.round][name], value.numpy())
    for site in ("hospital-0", "hospital-1"):  # each evaluation released (and recorded) once
        ledger = load_ledger(tmp_path / "state" / site / "state")
        assert ledger.run(RunFolder(out).read_settings().run_key).evaluated == (1, 2, 3)


def test_without_evaluation_a_round_is_committed_before_the_next_one_trains(
    demo_root: Path, tmp_path: Path
) -> None:
    committed: list[list[int]] = []  # the rounds in the history when each train message ran

    def spy(msg: Message, context) -> Message:
        committed.append([h.round for h in RunFolder(tmp_path / "t").read_history()])
        return client_app(msg, context)

    grid, run = federation(
        demo_root, tmp_path, 2, **{"num-server-rounds": 2, "fraction-evaluate": 0.0}
    )
    grid.client_app = spy
    run_federation(grid, run)
    assert committed == [[], [], [1], [1]]  # only train messages: none waits for an evaluation


def test_an_exchange_pushes_its_groups_in_turn_and_sorts_the_replies_back() -> None:
    class Grid:
        def __init__(self) -> None:
            self.pushed: list[list[str]] = []

        def push_messages(self, messages: list[Message]) -> list[str]:
            self.pushed.append([m.metadata.message_type for m in messages])
            return [f"{m.metadata.message_type}-{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids: list[str]) -> list[Message]:
            return [_reply(i) for i in reversed(ids)]  # in any order

    def ask(kind: str, node: int) -> Message:
        return Message(RecordDict(), dst_node_id=node, message_type=kind)

    grid = Grid()
    evaluated, trained = exchange_in_turn(
        grid, [[ask("evaluate", 1), ask("evaluate", 2)], [ask("train", 1)]], 5.0
    )
    assert grid.pushed == [["evaluate", "evaluate"], ["train"]]
    assert [m.metadata.reply_to_message_id for m in evaluated] == ["evaluate-1", "evaluate-2"]
    assert [m.metadata.reply_to_message_id for m in trained] == ["train-1"]
    assert exchange_in_turn(grid, [[], []], 5.0) == [[], []] and len(grid.pushed) == 2


def _reply(to: str) -> Message:
    """A reply to the message with id `to`."""
    reply = Message(RecordDict(), dst_node_id=1, message_type="train")
    reply.metadata.__dict__["_reply_to_message_id"] = to
    return reply


def _broken_copy(demo_root: Path, dest: Path) -> Path:
    shutil.copytree(demo_root / "hospital-0", dest / "hospital-0")
    shutil.copytree(demo_root / "hospital-1", dest / "hospital-1")
    manifest = dest / "hospital-1" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    rows[4]["label"] = "pneumothorax"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def test_a_failing_site_is_named_and_stops_the_run_below_min_nodes(
    demo_root: Path, tmp_path: Path
) -> None:
    data = _broken_copy(demo_root, tmp_path / "data")
    grid, run = federation(data, tmp_path / "out", 2, **{"num-server-rounds": 2})
    out = run_federation(grid, run)
    summary = RunFolder(out).read_summary()
    assert summary.status == "stopped" and summary.rounds_completed == 0
    assert re.search(
        r"Failed: hospital-1: bad-data: (.|\n)*"
        r"manifest.csv:6: unknown label 'pneumothorax'",
        summary.message,
    )
    (line,) = RunFolder(out).read_history()
    assert line.round == 1 and line.stopped and "hospital-1" in line.failures
    assert (out / "model.json").is_file()  # the last global model (here: the initial one)


@pytest.fixture
def run_output() -> Iterator[None]:
    """Remove the ServerApp's log handler after the test (it writes to the captured stderr)."""
    yield
    for name in server_app._LOGGERS:  # the handler `log_to_run_output` adds, by its name
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if h.get_name() == server_app._HANDLER_NAME]:
            logger.removeHandler(handler)


def test_the_serverapp_logs_each_round_and_fails_a_stopped_run_after_writing_it(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], run_output: None
) -> None:
    data = _broken_copy(demo_root, tmp_path / "data")
    out = tmp_path / "out"
    settings = {"output-dir": str(out), "run-name": "t", "state-root": str(out / "state")}
    config = tiny_user_config(data, **settings, **{"num-server-rounds": 2})
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RunStopped, match=r"stopped early: .*hospital-1.*Its run folder .*/out/t "):
        server_app.main(InProcessGrid(client_app, nodes, config), context)
    assert RunFolder(out / "t").read_summary().status == "stopped"  # written before the failure
    stream = capsys.readouterr().err  # what Flower forwards to `flwr run --stream` / `flwr log`
    assert re.search(r"round 1\nsite +loss +accuracy +auroc +epsilon +cap", stream), stream
    assert re.search(r"hospital-1 +failed: ", stream) and "stopped: " in stream
    assert re.search(
        r"\nINFO server.app: run stopped; run folder .*/out/t: The run stopped early", stream
    )


def test_the_others_carry_on_when_min_nodes_allows(demo_root: Path, tmp_path: Path) -> None:
    data = _broken_copy(demo_root, tmp_path / "data")
    grid, run = federation(data, tmp_path / "out", 2, **{"num-server-rounds": 1, "min-nodes": 1})
    out = run_federation(grid, run)
    (line,) = RunFolder(out).read_history()
    assert set(line.sites) == {"hospital-0"}
    assert "unknown label 'pneumothorax'" in line.failures["hospital-1"]


def test_a_folder_that_is_not_a_run_is_not_overwritten(demo_root: Path, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "history.jsonl").write_text("{}\n")
    grid, run = federation(demo_root, tmp_path, 2)
    with pytest.raises(ResumeError, match="not a FedFusion run"):
        run_federation(grid, run)
    assert (tmp_path / "t" / "history.jsonl").read_text() == "{}\n"


def test_noisy_counts_are_pooled_and_exact_metrics_averaged() -> None:
    """With noisy counts the coordinator's AUROC is over all rows; with exact releases, the mean."""
    rng = np.random.default_rng(0)
    sites, all_probs, all_labels = [], [], []
    for n in (40, 80):
        labels = rng.integers(0, 2, n)
        p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, n), 0, 1)
        probs = np.stack([1 - p1, p1], axis=1)
        all_probs.append(probs)
        all_labels.append(labels)
        counts = {"lacking": ScoreCounts.empty(2), "both": count_scores(probs, labels, 2)}
        sites.append((n, counts, metrics_from_counts(counts["both"], num_examples=n)))
    noisy = pooled_metrics(
        [
            SiteCounts(records=n, metrics={R.COUNT_NOISE: 1.0, R.LOSS: 0.5}, counts=c)
            for n, c, _ in sites
        ]
    )
    pooled = metrics_from_counts(sites[0][1]["both"] + sites[1][1]["both"], num_examples=120)
    assert noisy[R.AUROC] == pytest.approx(pooled.auroc) and noisy[R.LOSS] == pytest.approx(0.5)
    exact = pooled_metrics(
        [
            SiteCounts(records=n, metrics={R.COUNT_NOISE: 0.0, R.AUROC: m.auroc}, counts=c)
            for n, c, m in sites
        ]
    )
    assert exact[R.AUROC] == pytest.approx((40 * sites[0][2].auroc + 80 * sites[1][2].auroc) / 120)
    # the counts' AUROC over every row is the exact one at the bins' resolution
    from sklearn.metrics import roc_auc_score

    exact_pooled = roc_auc_score(np.concatenate(all_labels), np.concatenate(all_probs)[:, 1])
    assert noisy[R.AUROC] == pytest.approx(exact_pooled, abs=0.03)  # these scores span 2-3 bins
