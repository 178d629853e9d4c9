"""LoRA as a trainable set (`lora-rank`, `lora-layers`): what travels, exactness of the feature
cache with adapters, and adapters that really train under DP-SGD through a site's round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from client.rounds import LocalWork, train_locally
from client.state import SiteState
from common.config import ConfigError
from common.errors import ConfigurationError
from common.model.checkpoint import load_model, save_model
from common.model.feature_cache import CachedFusion, compute_features
from common.model.fusion_model import build_model
from common.model.lora import adapter_names
from common.model.trainable import frozen_fingerprint, trainable_names, trainable_state
from common.privacy.accounting import Account, sample_rate
from common.privacy.dpsgd import private_training
from common.training.loop import train
from tests.conftest import hospital, tiny_run
from tests.test_feature_cache import Cases, per_sample_grads

CPU = torch.device("cpu")


def test_adapters_are_the_text_encoders_only_trainable_part_and_start_as_the_identity() -> None:
    plain = build_model(tiny_run().model)
    model = build_model(tiny_run(lora_rank=4, lora_layers=1).model)
    names = adapter_names(model)
    # the tiny text encoder has 2 layers: adapters on the top one, (query, value) x (A, B)
    assert sorted(names) == sorted(
        f"text.encoder.layer.1.attention.self.{m}.lora_{ab}.default.weight"
        for m in ("query", "value")
        for ab in "AB"
    )
    assert [n for n in trainable_names(model) if n.startswith("text.")] == names
    assert set(trainable_names(plain)) < set(trainable_names(model))
    assert tuple(model.state_dict()[names[0]].shape) == (
        4,
        model.text.config.hidden_size,
    )  # A: rank x hidden
    data = next(iter(DataLoader(Cases(n=6), batch_size=6)))
    args = (
        data["images"],
        data["input_ids"],
        data["attention_mask"],
        data["has_image"],
        data["has_text"],
    )
    model.eval(), plain.eval()
    with torch.no_grad():  # B starts at zero: the same output as the model without adapters
        torch.testing.assert_close(model(*args), plain(*args))
    # every site builds the same adapters (seeded), so the frozen part's fingerprint agrees
    again = build_model(tiny_run(lora_rank=4, lora_layers=1).model)
    assert frozen_fingerprint(again) == frozen_fingerprint(model)
    for name, value in trainable_state(again).items():
        assert torch.equal(value, trainable_state(model)[name]), name


def test_cache_with_adapters_gives_the_full_models_per_sample_gradients() -> None:
    model = build_model(tiny_run(lora_rank=4, lora_layers=1, fusion="attention").model)
    net = CachedFusion(model)
    assert net.text_start == 1  # the front stops below the adapted layer
    data = Cases()
    features = compute_features(net, data, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    full = per_sample_grads(model, params, DataLoader(data, batch_size=1))
    cached = per_sample_grads(net, params, DataLoader(features, batch_size=1))
    for g_full, g_cached in zip(full, cached, strict=True):
        for a, b in zip(g_full, g_cached, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_every_adapter_tensor_changes_under_dp(mode: str) -> None:
    model = build_model(tiny_run(lora_rank=4, lora_layers=2).model)
    names = adapter_names(model)
    assert len(names) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    before = trainable_state(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ledger = Account(accountant="rdp", delta=1e-5, noise_multiplier=0.5, sample_rate=8 / 24)
    with private_training(
        model,
        optimizer,
        DataLoader(Cases(), batch_size=8),
        ledger,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    ) as session:
        train(model, session.loader, session.optimizer, session.criterion, epochs=1, device=CPU)
    after = trainable_state(model)
    for name in names:
        assert not torch.equal(after[name], before[name]), f"{name} did not change"


def test_a_dp_site_round_trains_and_sends_the_adapters(demo_root: Path, tmp_path: Path) -> None:
    """The symptom of opacus issue 820 (adapters that never move) through the site's own round."""
    run = tiny_run(demo_root, lora_rank=4, lora_layers=1, local_steps=3)
    site = SiteState(hospital(demo_root, tmp_path / "state"))
    model = site.bundle(run.model).model
    start = trainable_state(model)
    q = sample_rate(num_examples=len(site.data(run).train), batch_size=run.train.batch_size)
    account = Account(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=q)
    work = LocalWork(server_round=1, start=start, untrained=(), account=account, max_grad_norm=1.0)
    sent = train_locally(site, run, work).sent
    assert set(sent) == set(start)
    for name in adapter_names(model):
        assert not torch.equal(sent[name], start[name]), f"{name} was not trained"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lora_rank": 4, "lora_layers": 0}, "lora-layers is 0"),
        ({"lora_rank": 4, "trainable_text_layers": 1}, "both set"),
    ],
)
def test_inconsistent_lora_settings_are_rejected(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_run(**overrides)


def test_more_adapted_layers_than_the_encoder_has_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="lora-layers is 3 but the text encoder has 2"):
        build_model(tiny_run(lora_rank=4, lora_layers=3).model)


def test_a_saved_model_with_adapters_reloads_with_them(tmp_path: Path) -> None:
    """model.json keeps the LoRA settings: `fedfusion predict` rebuilds the same model."""
    model = build_model(tiny_run(lora_rank=4, lora_layers=2).model)
    with torch.no_grad():  # trained adapters (B no longer zero)
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_()
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert adapter_names(loaded) == adapter_names(model)
    for name, value in trainable_state(model).items():
        assert torch.equal(trainable_state(loaded)[name], value), name
