"""Distributed DP under secure aggregation (common.privacy.distributed): DP-FedSGD's pieces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from client.state import SiteState
from common.errors import ConfigurationError
from common.model.feature_cache import CachedFusion, compute_features
from common.model.modalities import frozen
from common.model.trainable import trainable_state
from common.privacy.accounting import epsilon_from_history
from common.privacy.distributed import (
    DistributedNoise,
    choose_scale,
    clipped_gradient_sum,
    ddp_epsilon,
    poisson_sample,
    ring_bits,
    server_step,
)
from tests.conftest import hospital, tiny_run

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """A model fed like a FusionModel: keyword inputs, logits (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return out


class Rows(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def rows(n: int = 7, seed: int = 1) -> Rows:
    g = torch.Generator().manual_seed(seed)
    return Rows(torch.randn(n, 3, generator=g) * 3, torch.randint(0, 2, (n,), generator=g))


def reference(model: nn.Module, data: Rows, c: float) -> dict[str, torch.Tensor]:
    """Per-sample loop: each row's gradient, clipped jointly to c, summed."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(data)):
        model.zero_grad()
        item = data[i]
        loss = nn.functional.cross_entropy(model(x=item["x"][None]), item["labels"][None])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        factor = min(1.0, c / float(norm))
        for n in names:
            total[n] += factor * grads[n]
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_clipped_sum_equals_a_per_sample_loop(mode: str) -> None:
    model, data = Tiny(), rows()
    got = clipped_gradient_sum(
        model, data, sample_rate=1.0, max_grad_norm=0.5, device=CPU, grad_sample_mode=mode
    )
    want = reference(model, data, 0.5)
    assert got.sampled == len(data) and got.non_finite == 0
    assert set(got.sums) == set(want)
    for name in want:
        torch.testing.assert_close(got.sums[name], want[name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_are_left_out() -> None:
    model, data = Tiny(), rows()
    with frozen(model, ["body.weight", "body.bias"]):
        got = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=0.5, device=CPU)
        want = reference(model, data, 0.5)
    assert set(got.sums) == {"head.weight", "head.bias"}
    for name in want:
        torch.testing.assert_close(got.sums[name], want[name], rtol=1e-4, atol=1e-6)


def test_a_fusion_model_and_its_cached_features_give_the_same_sum(
    demo_root: Path, tmp_path: Path
) -> None:
    run = tiny_run(demo_root)
    site = SiteState(hospital(demo_root, tmp_path))
    model, data = site.bundle(run.model).model, site.data(run).train  # a ManifestDataset
    rows = Subset(data, range(6))
    net = CachedFusion(model)
    features = compute_features(net, rows, CPU)
    names = set(trainable_state(model))
    full = clipped_gradient_sum(model, rows, sample_rate=1.0, max_grad_norm=0.1, device=CPU)
    cached = clipped_gradient_sum(net, features, sample_rate=1.0, max_grad_norm=0.1, device=CPU)
    assert set(full.sums) == set(cached.sums) == names  # FusionModel names, not "model.*"
    assert full.sampled == cached.sampled == len(rows)
    for name in names:
        torch.testing.assert_close(full.sums[name], cached.sums[name], rtol=1e-4, atol=1e-5)
    assert _norm(full.sums) <= 0.1 * len(rows) * (1 + 1e-5)
    assert all(
        p.grad is None and getattr(p, "grad_sample", None) is None for p in model.parameters()
    )


def _norm(sums: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in sums.values())))


def test_one_huge_row_moves_the_sum_by_at_most_c() -> None:
    model, data = Tiny(), rows(6)
    c = 0.3
    without = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=c, device=CPU)
    attack = Rows(
        torch.cat([data.x, torch.full((1, 3), 1e6)]), torch.cat([data.y, torch.tensor([1])])
    )
    with_row = clipped_gradient_sum(model, attack, sample_rate=1.0, max_grad_norm=c, device=CPU)
    diff = {n: with_row.sums[n] - without.sums[n] for n in without.sums}
    assert 0 < _norm(diff) <= c * (1 + 1e-5)
    single = clipped_gradient_sum(
        model, Rows(attack.x[-1:], attack.y[-1:]), sample_rate=1.0, max_grad_norm=c, device=CPU
    )
    assert _norm(single.sums) <= c * (1 + 1e-5)


def test_a_non_finite_row_contributes_zero() -> None:
    model, data = Tiny(), rows(5)
    clean = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=1.0, device=CPU)
    for poison in (math.nan, math.inf):
        bad = Rows(
            torch.cat([data.x, torch.full((1, 3), poison)]), torch.cat([data.y, torch.tensor([0])])
        )
        got = clipped_gradient_sum(model, bad, sample_rate=1.0, max_grad_norm=1.0, device=CPU)
        assert got.non_finite == 1 and got.sampled == 6
        for name in clean.sums:
            torch.testing.assert_close(got.sums[name], clean.sums[name])


def test_poisson_sample_is_seeded_or_secret() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = poisson_sample(1000, sample_rate=0.3, generator=g1)
    assert torch.equal(a, poisson_sample(1000, sample_rate=0.3, generator=g2))
    assert 200 < len(a) < 400
    secret = [len(poisson_sample(1000, sample_rate=0.3)) for _ in range(3)]
    assert all(200 < n < 400 for n in secret)
    model, data = Tiny(), rows(50)
    none = clipped_gradient_sum(model, data, sample_rate=1e-9, max_grad_norm=1.0, device=CPU)
    assert none.sampled == 0 and _norm(none.sums) == 0
    with pytest.raises(ValueError):
        poisson_sample(10, sample_rate=0.0)


def test_ghost_clipping_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        clipped_gradient_sum(
            Tiny(), rows(), sample_rate=1.0, max_grad_norm=1.0, device=CPU, grad_sample_mode="ghost"
        )


def noise(**changes: object) -> DistributedNoise:
    values: dict[str, object] = {
        "noise_multiplier": 1.5,
        "shares": 4,
        "max_grad_norm": 1.0,
        "scale": 100.0,
        "coordinates": 400,
    }
    values.update(changes)
    return DistributedNoise(**values)  # type: ignore[arg-type]


def test_shares_sum_to_the_full_noise() -> None:
    n = noise()
    assert n.sensitivity == 100.0 + 20.0
    assert n.share_variance == pytest.approx((1.5 * 120) ** 2 / 4)
    assert n.fallback_multiplier == pytest.approx(0.75)
    assert n.noise_bound == math.ceil(14 * math.sqrt(n.share_variance))
    rng = np.random.default_rng(0)
    total = sum(n.sample(20_000, rng) for _ in range(n.shares))
    assert isinstance(total, np.ndarray) and total.dtype == np.int64
    want = (1.5 * 120) ** 2
    assert total.var() == pytest.approx(want, rel=0.04)  # 20,000 samples: 1% std error
    assert abs(total.mean()) < 4 * math.sqrt(want / 20_000)
    tight = noise(noise_multiplier=0.01, shares=1, scale=100.0, coordinates=1)
    assert np.abs(tight.sample(10_000, rng)).max() <= tight.noise_bound


@pytest.mark.parametrize(
    "changes",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": math.nan},
        {"noise_multiplier": 1e5},
        {"shares": 0},
        {"shares": 2.0},
        {"shares": 65},
        {"max_grad_norm": -1.0},
        {"scale": math.inf},
        {"coordinates": 0},
        {"noise_multiplier": 1e-4, "scale": 1.0, "coordinates": 1},  # share variance < 1
        {"noise_multiplier": 1e4, "scale": 1e14},  # share variance > 2**60
    ],
)
def test_noise_bounds_are_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        noise(**changes)


def test_scale_keeps_rounding_within_the_inflation() -> None:
    s = choose_scale(max_grad_norm=2.0, coordinates=10_000, inflation=0.01)
    assert s == pytest.approx(100 / 0.02)
    n = noise(scale=s, max_grad_norm=2.0, coordinates=10_000)
    assert n.sensitivity == pytest.approx(1.01 * s * 2.0)
    with pytest.raises(ValueError):
        choose_scale(max_grad_norm=1.0, coordinates=10, inflation=0.0)


def test_ring_bits_hold_the_sum_of_every_site() -> None:
    bits = ring_bits(sites=5, max_batch=100, max_grad_norm=1.0, scale=1000.0, noise_bound=10**6)
    per_site = 100 * 1000 + 1 + 10**6
    assert 5 * per_site < 2 ** (bits - 1) <= 2 * 5 * per_site
    assert ring_bits(sites=2, max_batch=1, max_grad_norm=1.0, scale=1.0, noise_bound=0) == 16
    with pytest.raises(ConfigurationError, match="inflation"):
        ring_bits(sites=64, max_batch=10**6, max_grad_norm=1.0, scale=1e12, noise_bound=10**12)


def test_server_step_divides_by_the_expected_batch() -> None:
    theta = {"a": np.array([1.0, 2.0]), "b": np.array([[3.0]], dtype=np.float32)}
    out = server_step(theta, {"a": np.array([10.0, -20.0])}, expected_batch=5.0, learning_rate=0.5)
    np.testing.assert_allclose(out["a"], [0.0, 4.0])
    assert out["b"] is theta["b"]
    out = server_step(theta, {"b": np.array([[4.0]])}, expected_batch=2.0, learning_rate=1.0)
    assert out["b"].dtype == np.float32 and float(out["b"][0, 0]) == 1.0
    with pytest.raises(ValueError):
        server_step(theta, {}, expected_batch=0.0, learning_rate=1.0)
    with pytest.raises(ConfigurationError):
        server_step(theta, {"c": np.zeros(1)}, expected_batch=1.0, learning_rate=1.0)


def test_ddp_epsilon_is_the_accountants() -> None:
    eps = ddp_epsilon(noise_multiplier=2.0, sample_rate=0.2, steps=30, delta=1e-5)
    assert eps == epsilon_from_history([(2.0, 0.2, 30)], delta=1e-5, accountant="rdp")
    more = ddp_epsilon(noise_multiplier=4.0, sample_rate=0.2, steps=30, delta=1e-5)
    assert 0 < more < eps
