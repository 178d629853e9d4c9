"""The strategy choices: Flower's own classes with their settings, and their site-side parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.config import STRATEGIES
from common.model.checkpoint import load_tensors
from common.model.fusion_model import build_model
from common.model.trainable import trainable_state
from common.runfolder import RunFolder
from server.strategy import build_strategy, load_optimizer_state, optimizer_state
from tests.conftest import tiny_run
from tests.test_robustness import run


@pytest.mark.parametrize(
    ("name", "cls", "settings"),
    [
        ("fedavg", FedAvg, {}),
        ("fedavgm", FedAvgM, {"server_learning_rate": 0.03, "server_momentum": 0.0}),
        ("fedprox", FedProx, {"proximal_mu": 0.5}),
        ("fedadam", FedAdam, {"eta": 0.03}),
        ("fedyogi", FedYogi, {"eta": 0.03}),
        ("fedmedian", FedMedian, {}),
        ("fedtrimmedavg", FedTrimmedAvg, {"beta": 0.3}),
        ("krum", Krum, {"num_malicious_nodes": 2}),
        ("multikrum", MultiKrum, {"num_malicious_nodes": 2, "num_nodes_to_select": 3}),
    ],
)
def test_each_strategy_is_flowers_with_its_settings(
    name: str, cls: type, settings: dict, tmp_path: Path
) -> None:
    run_cfg = tiny_run(
        **{
            "strategy": name,
            "proximal-mu": 0.5,
            "server-learning-rate": 0.03,
            "trim-fraction": 0.3,
            "byzantine-sites": 2,
            "multikrum-select": 3,
            "min-nodes": 4,
        }
    )
    strategy = build_strategy(run_cfg.federation, run_cfg.aggregation)
    assert type(strategy) is cls and strategy.min_train_nodes == 4
    for attr, value in settings.items():
        assert getattr(strategy, attr) == value
    assert set(STRATEGIES) == {
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
    }


def test_fedprox_with_lr_times_mu_one_pins_sites_to_the_global_model(
    demo_root: Path, tmp_path: Path
) -> None:
    """lr * mu = 1: the proximal step returns each parameter to the global value every step."""
    out = run(
        demo_root,
        tmp_path,
        2,
        {},
        strategy="fedprox",
        **{"proximal-mu": 10.0, "learning-rate": 0.1},
    )
    initial = trainable_state(build_model(tiny_run(demo_root).model))
    after = load_tensors(out / "round-001.safetensors")
    for name, value in initial.items():
        np.testing.assert_allclose(after[name].numpy(), value.numpy(), atol=1e-6)


def test_fedadam_checkpoints_its_moments_and_a_resume_restores_them(
    demo_root: Path, tmp_path: Path
) -> None:
    out = run(demo_root, tmp_path, 2, {}, strategy="fedadam", **{"num-server-rounds": 2})
    saved = load_tensors(RunFolder(out).optimizer_checkpoint(2))
    names = set(trainable_state(build_model(tiny_run(demo_root).model)))
    assert {k.split("/", 1)[1] for k in saved} == names
    assert {k.split("/", 1)[0] for k in saved} == {"m_t", "v_t"}
    run_cfg = tiny_run(demo_root, strategy="fedadam")
    fresh = build_strategy(run_cfg.federation, run_cfg.aggregation)
    load_optimizer_state(fresh, {k: v.numpy() for k, v in saved.items()})
    restored = optimizer_state(fresh)
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value.numpy())


def test_fedavgm_gets_its_server_settings_and_a_resume_restores_its_momentum(
    demo_root: Path,
) -> None:
    run_cfg = tiny_run(
        demo_root, strategy="fedavgm", **{"server-learning-rate": 1.0, "server-momentum": 0.5}
    )
    strategy = build_strategy(run_cfg.federation, run_cfg.aggregation)
    assert (strategy.server_learning_rate, strategy.server_momentum) == (1.0, 0.5)
    arrays = ArrayRecord({"z": Array(np.zeros(2, np.float32)), "a": Array(np.zeros(3, np.float32))})
    strategy.current_arrays = arrays
    strategy.momentum_vector = [np.full(2, 1.0, np.float32), np.full(3, 2.0, np.float32)]
    saved = optimizer_state(strategy)
    assert set(saved) == {"momentum/z", "momentum/a"}
    fresh = build_strategy(run_cfg.federation, run_cfg.aggregation)
    load_optimizer_state(fresh, dict(sorted(saved.items())), arrays)  # a checkpoint sorts its keys
    assert [v.tolist() for v in fresh.momentum_vector] == [[1.0, 1.0], [2.0, 2.0, 2.0]]
