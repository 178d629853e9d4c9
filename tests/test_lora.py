"""LoRA adapters on the text encoder train under DP-SGD (every adapter tensor changes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from common.errors import ConfigurationError
from common.model.fusion_model import build_model
from common.model.lora import adapter_names, add_text_lora
from common.model.trainable import trainable_names, trainable_state
from common.privacy.accounting import Account
from common.privacy.dpsgd import private_training
from common.training.loop import train
from tests.conftest import tiny_run
from tests.test_feature_cache import Cases

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_every_adapter_tensor_changes_under_dp(mode: str) -> None:
    model = add_text_lora(build_model(tiny_run().model), rank=4, alpha=8, device=CPU)
    names = adapter_names(model)
    assert len(names) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert set(names) < set(trainable_names(model))
    assert any(n.startswith("fusion.") for n in trainable_names(model))
    assert not any(n.startswith("text.") and ".lora_" not in n for n in trainable_names(model))
    before = trainable_state(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ledger = Account(accountant="rdp", delta=1e-5, noise_multiplier=0.5, sample_rate=8 / 24)
    with private_training(model, optimizer, DataLoader(Cases(), batch_size=8), ledger, max_grad_norm=1.0,
                          grad_sample_mode=mode) as session:
        train(model, session.loader, session.optimizer, session.criterion, epochs=1, device=CPU)
    after = trainable_state(model)
    for name in names:
        assert not torch.equal(after[name], before[name]), f"{name} did not change"


def test_rank_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="rank"):
        add_text_lora(build_model(tiny_run().model), rank=0, alpha=8, device=CPU)
