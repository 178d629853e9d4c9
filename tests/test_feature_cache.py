"""The frozen-feature cache is exact: same logits, per-sample gradients and DP-SGD steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import ConfigurationError
from common.model.feature_cache import (
    CachedFusion,
    CacheKey,
    FeatureCache,
    compute_features,
    load_features,
    save_features,
)
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import load_trainable_state, trainable_state
from common.privacy.accounting import Account
from common.privacy.dpsgd import private_training
from common.training.loop import forward_batch, train
from tests.conftest import hospital, tiny_run

CPU = torch.device("cpu")
# (trainable-image-blocks, trainable-text-layers): encoders fully frozen (the default), and
# partly trainable, so that the cache holds the output of a frozen front part
SPLITS = ((0, 0), (1, 1))


class Cases(Dataset):
    """Random cases shaped for the tiny preset; some lack their image or their report."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 64, 64, generator=g)
        self.input_ids = torch.randint(1000, 2000, (n, 32), generator=g)
        self.attention_mask = (torch.arange(32) < torch.randint(4, 32, (n, 1), generator=g)).long()
        self.has_image = torch.arange(n) % 5 != 1
        self.has_text = torch.arange(n) % 7 != 2
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "images": self.images[i],
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "has_image": self.has_image[i],
            "has_text": self.has_text[i],
            "labels": self.labels[i],
        }


def tiny_model(blocks: int, layers: int, fusion: str = "attention") -> FusionModel:
    return build_model(
        tiny_run(fusion=fusion, trainable_image_blocks=blocks, trainable_text_layers=layers).model
    )


def per_sample_grads(
    model: torch.nn.Module, params: list[torch.Tensor], loader: DataLoader
) -> list[list[torch.Tensor]]:
    """Gradient of each example's loss (batches of one), in loader order."""
    model.train()
    grads = []
    for batch in loader:
        for p in params:
            p.grad = None
        torch.manual_seed(0)  # dropout in trainable text layers draws the same masks in both paths
        logits, labels = forward_batch(model, batch, CPU)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads.append([p.grad.clone() for p in params])
    return grads


@pytest.mark.parametrize("blocks,layers", SPLITS)
def test_cached_logits_and_per_sample_gradients_equal_the_full_model(
    blocks: int, layers: int
) -> None:
    model = tiny_model(blocks, layers)
    data = Cases()
    features = compute_features(CachedFusion(model), data, CPU)
    assert len(features) == len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    full = per_sample_grads(model, params, DataLoader(data, batch_size=1))
    cached = per_sample_grads(CachedFusion(model), params, DataLoader(features, batch_size=1))
    for g_full, g_cached in zip(full, cached, strict=True):
        for a, b in zip(g_full, g_cached, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float rounding: batch size
    model.eval()
    with torch.no_grad():
        full_logits, _ = forward_batch(model, next(iter(DataLoader(data, batch_size=24))), CPU)
        cached_logits, _ = forward_batch(CachedFusion(model), features[list(range(24))], CPU)
    torch.testing.assert_close(cached_logits, full_logits, rtol=1e-5, atol=1e-5)


def _dp_epoch(
    net: torch.nn.Module, model: FusionModel, dataset: Dataset, mode: str
) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9
    )
    ledger = Account(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=8 / 24)
    torch.manual_seed(123)  # the same Poisson batches and the same noise in both paths
    with private_training(
        net,
        optimizer,
        DataLoader(dataset, batch_size=8),
        ledger,
        max_grad_norm=0.5,
        grad_sample_mode=mode,
    ) as session:
        result = train(
            net, session.loader, session.optimizer, session.criterion, epochs=2, device=CPU
        )
    assert result.steps == 6
    return trainable_state(model)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("blocks,layers", SPLITS)
def test_dp_sgd_on_cached_features_takes_the_same_steps(
    mode: str, blocks: int, layers: int
) -> None:
    model, data = tiny_model(blocks, layers, fusion="concat"), Cases()
    start = trainable_state(model)
    features = compute_features(CachedFusion(model), data, CPU)
    full = _dp_epoch(model, model, data, mode)
    load_trainable_state(model, start)
    cached = _dp_epoch(CachedFusion(model), model, features, mode)
    for name, value in full.items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)


def key(**changes: object) -> CacheKey:
    base = dict(
        dataset_sha256="d1",
        split="train",
        frozen_fingerprint="f1",
        trainable_image_blocks=0,
        trained_text_layers=0,
        image_size=64,
        max_text_length=32,
    )
    return CacheKey(**{**base, **changes})


def test_cache_reuses_a_key_and_recomputes_when_any_field_changes(tmp_path: Path) -> None:
    model, data = tiny_model(0, 0), Cases(n=6)
    cache = FeatureCache()
    first = cache.get(key(), model, data, CPU)
    assert cache.get(key(), model, data, CPU) is first
    changed = [
        key(dataset_sha256="d2"),
        key(frozen_fingerprint="f2"),
        key(trained_text_layers=1),
        key(image_size=32),
        key(max_text_length=16),
        key(split="val"),
    ]
    assert len({k.digest() for k in changed} | {key().digest()}) == len(changed) + 1
    for k in changed:
        assert cache.get(k, model, data, CPU) is not first
    assert (cache.hits, cache.misses) == (1, 1 + len(changed))
    folder = tmp_path / "features"
    written = FeatureCache(disk_dir=folder).get(key(), model, data, CPU)
    path = folder / f"train-{key().digest()}.safetensors"
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"  # derived from patients
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    # a restarted process reads the file instead of computing (a model that would fail)
    restarted = FeatureCache(disk_dir=folder)
    read = restarted.get(key(), None, data, CPU)  # type: ignore[arg-type]
    for name, tensor in written.tensors.items():
        assert torch.equal(read.tensors[name], tensor), name
    FeatureCache(disk_dir=folder).get(key(dataset_sha256="d9"), model, data, CPU)
    assert [p.name for p in folder.iterdir()] == [
        f"train-{key(dataset_sha256='d9').digest()}.safetensors"
    ]


def test_cache_evicts_least_recently_used_beyond_its_memory_bound(tmp_path: Path) -> None:
    model, data = tiny_model(0, 0), Cases(n=4)
    one = compute_features(CachedFusion(model), data, CPU)
    cache = FeatureCache(max_bytes=2 * one.nbytes)
    a = cache.get(key(split="a"), model, data, CPU)
    cache.get(key(split="b"), model, data, CPU)
    cache.get(key(split="a"), model, data, CPU)  # a is now the most recent
    cache.get(key(split="c"), model, data, CPU)  # b goes
    assert cache.get(key(split="a"), model, data, CPU) is a
    misses = cache.misses
    cache.get(key(split="b"), model, data, CPU)
    assert cache.misses == misses + 1
    save_features(one, tmp_path / "x.safetensors")
    assert load_features(tmp_path / "x.safetensors").nbytes == one.nbytes


def test_augmenting_dataset_is_never_cached() -> None:
    data = Cases(n=4)
    data.augments = True
    with pytest.raises(ConfigurationError, match="feature-cache = false"):
        FeatureCache().get(key(), tiny_model(0, 0), data, CPU)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_site_round_sends_the_same_update_with_and_without_the_cache(
    demo_root: Path, tmp_path: Path, fusion: str
) -> None:
    from client.rounds import LocalWork, train_locally
    from client.state import SiteState

    states = []
    for cache in (True, False):
        run = tiny_run(demo_root, fusion=fusion, feature_cache=cache, trainable_text_layers=1)
        site = SiteState(hospital(demo_root, tmp_path / "state"))
        bundle = site.bundle(run.model)
        start = trainable_state(bundle.model) if not states else states[0][0]
        work = LocalWork(server_round=1, start=start, untrained=(), account=None, max_grad_norm=1.0)
        local = train_locally(site, run, work)
        states.append((start, local.sent, local.result.loss))
    (_, cached, loss_cached), (_, full, loss_full) = states
    assert loss_cached == pytest.approx(loss_full, rel=1e-5)
    for name, value in full.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)
