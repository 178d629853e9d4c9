"""The strategy choices: Flower's classes with our mixin in front, and their site-side parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.checkpoint import load_tensors
from common.config import STRATEGIES
from common.model import build_model, trainable_state
from server.history import RunRecorder, optimizer_checkpoint
from server.strategy import FederationMixin, build_strategy
from tests.conftest import tiny_run
from tests.test_robustness import run


@pytest.mark.parametrize(("name", "cls", "settings"), [
    ("fedavg", FedAvg, {}),
    ("fedprox", FedProx, {"proximal_mu": 0.5}),
    ("fedadam", FedAdam, {"eta": 0.03}),
    ("fedyogi", FedYogi, {"eta": 0.03}),
    ("fedmedian", FedMedian, {}),
    ("fedtrimmedavg", FedTrimmedAvg, {"beta": 0.3}),
    ("krum", Krum, {"num_malicious_nodes": 2}),
    ("multikrum", MultiKrum, {"num_malicious_nodes": 2, "num_nodes_to_select": 3}),
])
def test_each_strategy_is_flowers_with_its_settings(name: str, cls: type, settings: dict,
                                                    tmp_path: Path) -> None:
    run_cfg = tiny_run(**{"strategy": name, "proximal-mu": 0.5, "server-learning-rate": 0.03,
                          "trim-fraction": 0.3, "byzantine-sites": 2, "multikrum-select": 3,
                          "min-nodes": 4})
    strategy = build_strategy(run_cfg.federation, run_cfg.aggregation, recorder=None)  # type: ignore[arg-type]
    assert isinstance(strategy, cls) and isinstance(strategy, FederationMixin)
    assert type(strategy).__mro__[1] is FederationMixin and strategy.min_train_nodes == 4
    for attr, value in settings.items():
        assert getattr(strategy, attr) == value
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian",
                               "fedtrimmedavg", "krum", "multikrum"}


def test_fedprox_with_lr_times_mu_one_pins_sites_to_the_global_model(demo_root: Path,
                                                                     tmp_path: Path) -> None:
    """lr * mu = 1: the proximal step returns each parameter to the global value every step."""
    out = run(demo_root, tmp_path, 2, {}, strategy="fedprox", **{"proximal-mu": 10.0,
                                                                 "learning-rate": 0.1})
    initial = trainable_state(build_model(tiny_run(demo_root).model))
    after = load_tensors(out / "round-001.safetensors")
    for name, value in initial.items():
        np.testing.assert_allclose(after[name].numpy(), value.numpy(), atol=1e-6)


def test_fedadam_checkpoints_its_moments_and_a_resume_restores_them(demo_root: Path,
                                                                    tmp_path: Path) -> None:
    out = run(demo_root, tmp_path, 2, {}, strategy="fedadam", **{"num-server-rounds": 2})
    saved = load_tensors(optimizer_checkpoint(out, 2))
    names = set(trainable_state(build_model(tiny_run(demo_root).model)))
    assert {k.split("/", 1)[1] for k in saved} == names
    assert {k.split("/", 1)[0] for k in saved} == {"m_t", "v_t"}
    run_cfg = tiny_run(demo_root, strategy="fedadam")
    fresh = build_strategy(run_cfg.federation, run_cfg.aggregation, RunRecorder(tmp_path, None))  # type: ignore[arg-type]
    fresh.load_optimizer_state({k: v.numpy() for k, v in saved.items()})
    restored = fresh.optimizer_state()
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value.numpy())
