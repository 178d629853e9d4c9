"""Dishonest sites against the coordinator: each reply is checked before use, none crashes the run.

Each test is an attack by one hospital (its reply rewritten after the honest ClientApp ran); the
coordinator must record it, leave it out or bound it, and finish the round with the others.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from common import protocol as R
from common.config import default_user_config
from common.model.checkpoint import load_tensors
from common.runfolder import RunFolder
from server.sites import SiteNames
from tests.test_robustness import Fault, run, scaled


def _metrics(**changes: object) -> Fault:
    """A fault that rewrites the reply's metrics."""

    def fault(received: Message, reply: Message) -> Message:
        if not reply.has_error():
            reply.content[R.METRICS] = MetricRecord({**dict(reply.content[R.METRICS]), **changes})
        return reply

    return fault


def _both(first: Fault, second: Fault) -> Fault:
    return lambda received, reply: second(received, first(received, reply))


def _drop_metrics(received: Message, reply: Message) -> Message:
    del reply.content[R.METRICS]
    return reply


def _claim(name: str) -> Fault:
    def fault(received: Message, reply: Message) -> Message:
        reply.content[R.SITE] = ConfigRecord({R.SITE_NAME: name})
        return reply

    return fault


def test_malformed_replies_are_rejected_and_the_round_goes_on(
    demo_root: Path, tmp_path: Path
) -> None:
    out = RunFolder(
        run(
            demo_root,
            tmp_path,
            3,
            {0: _metrics(**{R.NUM_EXAMPLES: math.nan}), 1: _drop_metrics},
            **{"min-nodes": 1},
        )
    )
    (line,) = out.read_history()
    assert line.finished and set(line.rejected) == {"hospital-0", "hospital-1"}
    assert "num-examples is nan" in line.rejected["hospital-0"]
    assert "no 'metrics' record" in line.rejected["hospital-1"]
    assert line.sites["hospital-2"].train is not None


def _extra_arrays(received: Message, reply: Message) -> Message:
    if not reply.has_error():
        reply.content["smuggled"] = ArrayRecord({"x": Array(np.ones(3, dtype=np.float32))})
    return reply


def test_extra_metrics_or_records_are_rejected_and_the_round_goes_on(
    demo_root: Path, tmp_path: Path
) -> None:
    """A metric the protocol does not have (a list, which Flower's averaging cannot add up,
    crashed the coordinator) or an extra record is not passed on to aggregation."""
    out = RunFolder(
        run(
            demo_root,
            tmp_path,
            3,
            {0: _metrics(smuggled=[1.0, 2.0]), 1: _extra_arrays},
            **{"min-nodes": 1},
        )
    )
    (line,) = out.read_history()
    assert line.finished and set(line.rejected) == {"hospital-0", "hospital-1"}
    assert "smuggled" in line.rejected["hospital-0"]
    assert "smuggled" in line.rejected["hospital-1"]
    assert line.sites["hospital-2"].train is not None


@pytest.mark.slow
def test_a_huge_weight_is_rejected_and_a_large_one_capped(
    five_hospitals: Path, tmp_path: Path
) -> None:
    """An update scaled by -5 that claims 1e9 (then 1e7) records, screening at its defaults.

    At the old default (20 x the median) the 1e7 claim still held 84% of the weight."""
    poison = scaled(-5.0)
    huge = RunFolder(
        run(
            five_hospitals,
            tmp_path / "huge",
            5,
            {4: _both(poison, _metrics(**{R.NUM_EXAMPLES: 10**9}))},
        )
    )
    (line,) = huge.read_history()
    assert "not a whole number from 1 to" in line.rejected["hospital-4"]
    large = RunFolder(
        run(
            five_hospitals,
            tmp_path / "large",
            5,
            {4: _both(poison, _metrics(**{R.NUM_EXAMPLES: 10**7}))},
        )
    )
    (line,) = large.read_history()
    weights = sorted(s.train[R.NUM_EXAMPLES] for s in line.sites.values())
    factor = default_user_config()["max-weight-factor"]
    cap = int(factor * weights[(len(weights) - 1) // 2])  # max-weight-factor x the lower median
    assert f"capped to {cap}" in line.capped["hospital-4"]
    honest = [s.train[R.NUM_EXAMPLES] for name, s in line.sites.items() if name != "hospital-4"]
    assert cap / (cap + sum(honest)) < 0.4  # its share of the weight, once capped
    # the aggregate is exactly the one of a site that had claimed the cap: its weight was bounded
    bounded = RunFolder(
        run(
            five_hospitals,
            tmp_path / "bounded",
            5,
            {4: _both(poison, _metrics(**{R.NUM_EXAMPLES: cap}))},
        )
    )
    expected = load_tensors(bounded.path / "round-001.safetensors")
    for name, value in load_tensors(large.path / "round-001.safetensors").items():
        np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=1e-5, atol=1e-7)


def test_a_node_cannot_write_under_another_hospitals_name(demo_root: Path, tmp_path: Path) -> None:
    """Unpinned (a simulation): the first node to claim a name keeps it."""
    out = RunFolder(run(demo_root, tmp_path, 3, {2: _claim("hospital-0")}))
    (line,) = out.read_history()
    assert set(line.sites) == {"hospital-0", "hospital-1", "hospital-0 (node 3)"}
    assert line.sites["hospital-0"].node_id == 1 and line.sites["hospital-0 (node 3)"].node_id == 3


def test_names_are_bound_to_node_ids_and_an_unknown_node_takes_no_part(
    demo_root: Path, tmp_path: Path
) -> None:
    """Node 1 answers first claiming hospital-2's name; node 4 is online but not in site-nodes."""
    replied: list[int] = []
    pinned = "1=hospital-0,2=hospital-1,3=hospital-2"
    out = RunFolder(
        run(
            demo_root,
            tmp_path,
            4,
            {0: _claim("hospital-2")},
            tap=lambda node, reply: replied.append(node),
            **{"site-nodes": pinned, "num-server-rounds": 2},
        )
    )
    history = out.read_history()
    assert [h.round for h in history] == [1, 2] and all(h.finished for h in history)
    for line in history:
        assert {s: e.node_id for s, e in line.sites.items()} == {
            "hospital-0": 1,
            "hospital-1": 2,
            "hospital-2": 3,
        }
        assert "not among the run's site-nodes" in line.rejected["node 4"]
    assert 4 not in replied  # never sent the model, never aggregated


def test_registered_names_bind_nodes_whatever_their_replies_claim() -> None:
    """Unpinned deployment: the SuperLink's registration names (`--name`) bind the nodes."""
    names = SiteNames()
    names.register(5, "hospital-a")
    names.register(6, "hospital-a")  # a second key registered under the same name
    assert names.name(5, "hospital-b") == "hospital-a"
    assert names.name(6, "hospital-a") == "hospital-a (node 6)"
    assert names.name(7, "hospital-a") == "hospital-a (node 7)"  # unregistered: its claim, second
    pinned = SiteNames({5: "hospital-a"}, pinned=True)
    pinned.register(8, "hospital-b")  # registration does not add a node to a pinned run
    assert not pinned.known(8) and pinned.name(8, "hospital-b") == "node 8"
