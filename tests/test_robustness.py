"""Fault injection: failing, stalling and misbehaving hospitals, screened updates, partial updates.

Faulty hospitals are the real ClientApp with a fault wrapped around its train handler; the
ServerApp and the ClientApps run in one process (simulations/inprocess.py), without DP so that
runs are deterministic and fast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as client_app
from common import protocol as R
from common.model.checkpoint import load_tensors
from common.runfolder import RunFolder
from server.app import run_federation
from server.screening import (
    Update,
    UpdateBounds,
    complete_partial_updates,
    screen_updates,
)
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config

Fault = Callable[[Message, Message], Message]  # (received, honest reply) -> reply sent


# --- the screening rules, on known arrays --------------------------------------------------

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


def _update(site: str, scale: float = 0.1, n: int = 10, **changes: np.ndarray) -> Update:
    arrays = {k: v + np.float32(scale) for k, v in GLOBAL.items()}
    arrays.update(changes)
    return Update(site=site, arrays=arrays, untrained=(), num_examples=n)


@pytest.mark.parametrize(
    ("arrays", "untrained", "reason"),
    [
        ({"a": GLOBAL["a"]}, (), "missing parameter(s) not declared untrained: b"),
        ({**GLOBAL, "c": GLOBAL["b"]}, (), "the model does not have: c"),
        (
            {**GLOBAL, "a": np.zeros((3, 2), np.float32)},
            (),
            "parameter a has shape (3, 2), expected (2, 3)",
        ),
        (
            {**GLOBAL, "b": np.ones(4, np.float64)},
            (),
            "parameter b has dtype float64, expected float32",
        ),
        (
            {**GLOBAL, "b": np.array([1, np.nan, 1, 1], np.float32)},
            (),
            "parameter b holds NaN or Inf",
        ),
        (
            {**GLOBAL, "b": np.array([1, np.inf, 1, 1], np.float32)},
            (),
            "parameter b holds NaN or Inf",
        ),
        (GLOBAL, ("b",), "both sent and declared untrained: b"),
        ({}, (), "holds no parameters"),
    ],
)
def test_malformed_updates_are_rejected_with_the_reason(
    arrays: dict, untrained: tuple, reason: str
) -> None:
    bad = Update(site="bad", arrays=dict(arrays), untrained=untrained, num_examples=10)
    screening = screen_updates([bad, _update("good")], GLOBAL, UpdateBounds())
    assert [u.site for u in screening.accepted] == ["good"]
    assert reason in screening.rejected["bad"]


def test_norm_bounds_fixed_and_relative_to_the_median() -> None:
    updates = [_update("s1", 0.1), _update("s2", 0.12), _update("s3", 0.09), _update("big", 100.0)]
    norm_s1 = np.sqrt(10 * 0.1**2)  # 10 coordinates each moved by 0.1
    screening = screen_updates(updates, GLOBAL, UpdateBounds(median_factor=10.0))
    assert screening.norms["s1"] == pytest.approx(norm_s1, rel=1e-6)
    assert list(screening.rejected) == ["big"] and "median norm" in screening.rejected["big"]
    fixed = screen_updates(updates[:2], GLOBAL, UpdateBounds(max_norm=0.35))
    assert list(fixed.rejected) == ["s2"] and "max-update-norm 0.35" in fixed.rejected["s2"]
    # two updates have no meaningful median: the relative bound needs three
    assert not screen_updates(
        [updates[0], updates[3]], GLOBAL, UpdateBounds(median_factor=10.0)
    ).rejected


def test_a_left_out_parameter_takes_the_mean_of_the_sites_that_trained_it() -> None:
    full_1 = _update("s1", 1.0, n=10)
    full_2 = _update("s2", 2.0, n=30)
    partial = Update(site="s3", arrays={"a": GLOBAL["a"] + 5}, untrained=("b",), num_examples=60)
    complete = complete_partial_updates([full_1, full_2, partial], GLOBAL)
    np.testing.assert_allclose(complete[2]["b"], GLOBAL["b"] + (1.0 * 10 + 2.0 * 30) / 40)
    np.testing.assert_array_equal(complete[2]["a"], partial.arrays["a"])
    # so the FedAvg of the completed updates is, for b, the average over its trainers alone
    fedavg_b = sum(c["b"] * n for c, n in zip(complete, (10, 30, 60), strict=True)) / 100
    np.testing.assert_allclose(fedavg_b, GLOBAL["b"] + 1.75, rtol=1e-6)
    # a parameter nobody trained keeps its global value
    nobody = complete_partial_updates(
        [Update(site="s", arrays={"a": GLOBAL["a"] + 1}, untrained=("b",), num_examples=5)], GLOBAL
    )
    np.testing.assert_array_equal(nobody[0]["b"], GLOBAL["b"])


# --- faulty hospitals in a federation ------------------------------------------------------


def faulty_client_app(
    faults: dict[int, Fault], stalls: dict[int, threading.Event] | None = None
) -> ClientApp:
    """The real ClientApp; hospital i's train reply passes through faults[i] when it has one.

    A hospital in `stalls` hangs before training until its event is set, then fails.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if stalls and partition in stalls:
            # hang, then give up without touching the model: this thread outlives the round, and
            # training now would race the next test for torch's global RNG and the cached model
            stalls[partition].wait(300)
            raise TimeoutError("stalled site released")
        reply = client_app.train(msg, context)
        fault = faults.get(partition)
        return fault(msg, reply) if fault else reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app.evaluate(msg, context)

    return app


def _map_update(fn: Callable[[str, np.ndarray, np.ndarray], np.ndarray]) -> Fault:
    """A fault that replaces each sent parameter by fn(name, global value, honest value)."""

    def fault(received: Message, reply: Message) -> Message:
        start = received.content[R.ARRAYS]
        sent = reply.content[R.ARRAYS]
        reply.content[R.ARRAYS] = ArrayRecord(
            {k: Array(fn(k, start[k].numpy(), v.numpy())) for k, v in sent.items()}
        )
        return reply

    return fault


def scaled(factor: float) -> Fault:
    """Send global + factor * (honest update)."""
    return _map_update(lambda _, g, w: (g + factor * (w - g)).astype(w.dtype))


def nan_in(name_part: str) -> Fault:
    return _map_update(lambda k, _, w: np.full_like(w, np.nan) if name_part in k else w)


def wrong_shape(name_part: str) -> Fault:
    return _map_update(lambda k, _, w: w.reshape(-1)[:-1] if name_part in k else w)


def raises(received: Message, reply: Message) -> Message:
    raise RuntimeError("the GPU driver crashed")


def run(
    data_root: Path,
    out: Path,
    sites: int,
    faults: dict[int, Fault],
    tap=None,
    stalls: dict[int, threading.Event] | None = None,
    **overrides: object,
) -> Path:
    """A federation of `sites` hospitals without DP; returns the run folder."""
    settings = {
        "output-dir": str(out),
        "run-name": "r",
        "state-root": str(out / "state"),
        "dp": False,
        "num-server-rounds": 1,
        **overrides,
    }
    grid = InProcessGrid(
        faulty_client_app(faults, stalls),
        [{"partition-id": i, "num-partitions": sites} for i in range(sites)],
        tiny_user_config(data_root, **settings),
        tap=tap,
    )
    return run_federation(grid, tiny_run(data_root, **settings))


def test_a_site_that_raises_does_not_stop_the_round(demo_root: Path, tmp_path: Path) -> None:
    out = RunFolder(run(demo_root, tmp_path, 3, {1: raises}, **{"num-server-rounds": 2}))
    history = out.read_history()
    assert [h.round for h in history] == [1, 2] and all(h.finished for h in history)
    for h in history:
        assert "the GPU driver crashed" in h.failures["hospital-1"]
        assert h.sites["hospital-0"].train and h.sites["hospital-2"].train
    assert out.read_summary().sites["hospital-1"].rounds_failed == [1, 2]


def test_malformed_and_huge_updates_are_rejected_and_never_aggregated(
    five_hospitals: Path, tmp_path: Path
) -> None:
    received: dict[int, dict[str, np.ndarray]] = {}
    weights: dict[int, int] = {}

    def tap(node: int, reply: Message) -> None:
        if not reply.has_error() and R.ARRAYS in reply.content:
            received[node] = {k: v.numpy().copy() for k, v in reply.content[R.ARRAYS].items()}
            weights[node] = int(reply.content[R.METRICS][R.NUM_EXAMPLES])

    faults = {1: nan_in("head"), 2: wrong_shape("head"), 3: scaled(1000.0)}
    out = run(five_hospitals, tmp_path, 5, faults, tap=tap)
    (line,) = RunFolder(out).read_history()
    rejected = line.rejected
    assert set(rejected) == {"hospital-1", "hospital-2", "hospital-3"}
    assert "NaN or Inf" in rejected["hospital-1"]
    assert "has shape" in rejected["hospital-2"]
    assert "median norm" in rejected["hospital-3"]
    assert RunFolder(out).read_summary().sites["hospital-3"].rounds_rejected == [1]
    # the global model is the FedAvg of the two honest hospitals (nodes 1 and 5) alone
    saved = load_tensors(out / "round-001.safetensors")
    for name, value in saved.items():
        if name not in received[1]:  # trained by no site: the placeholders (every row has both)
            continue
        expected = np.average(
            [received[n][name] for n in (1, 5)], axis=0, weights=[weights[1], weights[5]]
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_too_few_usable_updates_stop_the_run_with_the_reasons(
    demo_root: Path, tmp_path: Path
) -> None:
    out = run(demo_root, tmp_path, 3, {0: nan_in("head"), 1: raises})
    summary = RunFolder(out).read_summary()
    assert summary.status == "stopped"
    assert "1 site(s) sent a usable update, fewer than min-nodes=2" in summary.message
    assert "Rejected: hospital-0: malformed update" in summary.message
    assert "the GPU driver crashed" in summary.message


@pytest.mark.slow  # waits out a 15 s round timeout (twice: in process, push blocks)
def test_a_stalled_site_is_left_behind_at_the_round_timeout(
    demo_root: Path, tmp_path: Path
) -> None:
    release = threading.Event()  # hospital 2 hangs until the test ends
    # no evaluation: the hung site would be waited for a second time, to no more effect
    settings = {"round-timeout": 15.0, "fraction-evaluate": 0.0}
    try:
        out = run(demo_root, tmp_path, 3, {}, stalls={2: release}, **settings)
    finally:
        release.set()
    (line,) = RunFolder(out).read_history()
    assert line.finished and set(line.sites) >= {"hospital-0", "hospital-1"}
    assert "hospital-2" not in line.sites or line.sites["hospital-2"].train is None  # never arrived


def _final_auroc(out: Path) -> float:
    return RunFolder(out).read_history()[-1].aggregate[R.AUROC]


@pytest.mark.slow
def test_a_robust_strategy_resists_a_poisoned_hospital(
    five_hospitals: Path, tmp_path: Path
) -> None:
    """Hospital 4 sends its update scaled by -10; screening is off so the strategies face it.

    Measured here (tiny preset, 3 rounds, no DP): clean FedAvg 0.803, poisoned FedAvg 0.521,
    clean FedMedian 0.828, poisoned FedMedian 0.822.
    """
    # the recipe these numbers were measured with: the DP recipe's defaults (20 steps of batch 32,
    # momentum 0.5, fusion-dim 32) gave clean FedAvg 0.51 here: too little for this test to see
    common = {
        "num-server-rounds": 3,
        "update-norm-factor": 0.0,
        "local-steps": 0,
        "batch-size": 64,
        "momentum": 0.9,
        "fusion-dim": 128,
    }
    poison = {4: scaled(-10.0)}
    auroc = {
        (strategy, poisoned): _final_auroc(
            run(
                five_hospitals,
                tmp_path / f"{strategy}-{poisoned}",
                5,
                poison if poisoned else {},
                **common,
                strategy=strategy,
            )
        )
        for strategy in ("fedavg", "fedmedian")
        for poisoned in (False, True)
    }
    print(
        "final AUROC "
        + ", ".join(f"{s}{' poisoned' if p else ''} {a:.3f}" for (s, p), a in auroc.items())
    )
    assert abs(auroc["fedmedian", True] - auroc["fedmedian", False]) <= 0.02
    assert abs(auroc["fedmedian", True] - auroc["fedavg", False]) <= 0.05
    assert auroc["fedavg", True] < auroc["fedavg", False] - 0.1  # plain FedAvg is visibly hurt


@pytest.mark.slow
def test_the_weight_cap_bounds_a_sign_flipping_site_that_claims_1e7_records(
    five_hospitals: Path, tmp_path: Path
) -> None:
    """Hospital 4 sends its update negated (the norm of an honest one: screening cannot see it)
    and claims 1e7 records. Measured here (recipe of the test above): clean FedAvg 0.803; the
    attack under FedAvg with max-weight-factor 20: 0.469, 3: 0.720, 2 (the default): 0.755, 1:
    0.785; FedMedian 0.815, FedTrimmedAvg 0.787, Krum 0.758, MultiKrum 0.791.
    """
    common = {
        "num-server-rounds": 3,
        "local-steps": 0,
        "batch-size": 64,
        "momentum": 0.9,
        "fusion-dim": 128,
    }

    def liar(received: Message, reply: Message) -> Message:
        reply = scaled(-1.0)(received, reply)
        metrics = reply.content[R.METRICS]
        metrics[R.NUM_EXAMPLES] = 10**7
        return reply

    clean = _final_auroc(run(five_hospitals, tmp_path / "clean", 5, {}, **common))
    capped = _final_auroc(run(five_hospitals, tmp_path / "capped", 5, {4: liar}, **common))
    loose = _final_auroc(
        run(
            five_hospitals,
            tmp_path / "loose",
            5,
            {4: liar},
            **common,
            **{"max-weight-factor": 20.0},
        )
    )
    assert capped >= clean - 0.1  # the default cap: the honest majority still decides
    assert loose < clean - 0.2  # the old default: the liar decided
