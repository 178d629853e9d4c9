"""The fusion model: shapes, masking of a missing modality, the trainable set, the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.model.encoders import (
    ModelLoadError,
    build_image_encoder,
    build_text_encoder,
)
from common.model.fusion import WeightedFusion
from common.model.fusion_model import build_model
from common.model.trainable import (
    TrainableMismatch,
    frozen_fingerprint,
    load_trainable_state,
    trainable_names,
    trainable_state,
)
from tests.conftest import tiny_run

FUSIONS = ("concat", "weighted", "attention")


def batch(model: nn.Module, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch shaped for `model`'s config."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s, t = cfg.image_size, cfg.max_text_length
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, t // 2 :] = 0
    return {
        "images": torch.randn(b, 3, s, s, generator=g),
        "input_ids": torch.randint(1000, 2000, (b, t), generator=g),
        "attention_mask": mask,
        "has_image": torch.ones(b, dtype=torch.bool),
        "has_text": torch.ones(b, dtype=torch.bool),
    }


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(x["images"], x["input_ids"], x["attention_mask"], x["has_image"], x["has_text"])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_touches_only_the_trainable_set(fusion: str) -> None:
    model = build_model(tiny_run(fusion=fusion).model).train()
    x = batch(model)
    x["has_image"][0], x["has_text"][1] = False, False  # so the placeholders are used too
    out = logits(model, x)
    assert out.shape == (4, 3)
    out.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_missing_modality_is_masked_not_read(fusion: str) -> None:
    model = build_model(tiny_run(fusion=fusion).model).eval()
    x, y = batch(model, seed=1), batch(model, seed=2)
    x["has_image"][:2] = False  # samples 0,1: no image; samples 2,3: no text
    x["has_text"][2:] = False
    y["has_image"], y["has_text"] = x["has_image"], x["has_text"]
    y["input_ids"][:2], y["attention_mask"][:2] = x["input_ids"][:2], x["attention_mask"][:2]
    y["images"][2:] = x["images"][2:]
    with torch.no_grad():
        # y differs from x only in the modality each sample lacks: the logits must not change
        torch.testing.assert_close(logits(model, x), logits(model, y))
        y["images"][2:] += 1.0  # the modality it has does change them
        assert not torch.allclose(logits(model, x)[2:], logits(model, y)[2:])


def test_weighted_fusion_weights_start_equal_and_sum_to_one() -> None:
    model = build_model(tiny_run(fusion="weighted").model)
    assert isinstance(model.fusion, WeightedFusion)
    torch.testing.assert_close(model.fusion.modality_weights(), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(("text_layers", "image_blocks"), [(0, 0), (1, 0), (1, 1), (2, 2)])
def test_trainable_set_is_configurable(text_layers: int, image_blocks: int) -> None:
    model = build_model(
        tiny_run(trainable_text_layers=text_layers, trainable_image_blocks=image_blocks).model
    )
    names = trainable_names(model)
    assert any(n.startswith("fusion.") for n in names) and "head.weight" in names
    text_trained = {int(n.split(".")[3]) for n in names if n.startswith("text.encoder.layer.")}
    assert text_trained == set(range(2 - text_layers, 2))
    image_trained = {n.split(".")[1] for n in names if n.startswith("image.")}
    assert image_trained == {f"layer{i}" for i in range(5 - image_blocks, 5)}
    assert not any(".bn" in n or "embeddings" in n for n in names)


def test_trainable_text_layers_beyond_the_encoder_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="only 2 layers"):
        build_model(tiny_run(trainable_text_layers=3).model)


def test_batchnorm_stays_in_eval_mode_and_its_statistics_do_not_move() -> None:
    model = build_model(tiny_run(trainable_image_blocks=1).model).train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    logits(model, batch(model)).sum().backward()
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_fingerprint_identifies_the_frozen_part_only() -> None:
    a, b = build_model(tiny_run().model), build_model(tiny_run().model)
    assert frozen_fingerprint(a) == frozen_fingerprint(b)  # seeded init is reproducible
    with torch.no_grad():
        a.head.weight.add_(1.0)  # trainable: no effect
    assert frozen_fingerprint(a) == frozen_fingerprint(b)
    assert frozen_fingerprint(build_model(tiny_run(seed=1).model)) != frozen_fingerprint(b)


def test_load_trainable_state_roundtrip_and_mismatch() -> None:
    a, b = build_model(tiny_run(seed=1).model), build_model(tiny_run(seed=2).model)
    load_trainable_state(b, trainable_state(a))
    for (name, x), y in zip(trainable_state(a).items(), trainable_state(b).values(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    state = trainable_state(a)
    state.pop("head.bias")
    with pytest.raises(TrainableMismatch, match=r"missing \['head.bias'\]"):
        load_trainable_state(b, state)
    state = trainable_state(a)
    state["head.bias"] = torch.zeros(7)
    with pytest.raises(TrainableMismatch, match=r"head\.bias has shape"):
        load_trainable_state(b, state)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("blocks", [0, 1])
def test_model_passes_opacus_strict_validation(fusion: str, blocks: int) -> None:
    model = build_model(
        tiny_run(fusion=fusion, trainable_text_layers=1, trainable_image_blocks=blocks).model
    ).train()
    ModuleValidator.validate(model, strict=True)


def test_image_weights_load_from_a_local_file(tmp_path: Path) -> None:
    source = build_image_encoder("resnet10", "", seed=3)
    path = tmp_path / "resnet10.pth"
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(1000, 512)}, path)
    loaded = build_image_encoder("resnet10", str(path), seed=99)
    for (name, x), y in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    with pytest.raises(ModelLoadError, match="do not fit a torchvision resnet18"):
        build_image_encoder("resnet18", str(path), seed=0)
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_image_encoder("resnet10", str(tmp_path / "nope.pth"), seed=0)


def test_text_encoder_from_a_local_directory(tmp_path: Path) -> None:
    enc = build_text_encoder("builtin:tiny", seed=0)
    enc.model.save_pretrained(tmp_path / "bert")
    enc.tokenizer.save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder(str(tmp_path / "bert"), seed=5)
    for (name, x), y in zip(
        enc.model.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, msg=name)


def test_missing_text_encoder_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_text_encoder(str(tmp_path / "no-such-model"), seed=0)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        build_text_encoder(str(tmp_path), seed=0)
    with pytest.raises(ModelLoadError, match="is not installed"):
        build_text_encoder("pkg:no_such_package_here", seed=0)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_step_updates_every_trainable_parameter(fusion: str, mode: str) -> None:
    from torch.utils.data import DataLoader

    from common.privacy.accounting import Account
    from common.privacy.dpsgd import private_training

    model = build_model(
        tiny_run(fusion=fusion, trainable_text_layers=1, trainable_image_blocks=1).model
    )
    x = batch(model, b=8)
    x["has_image"][0], x["has_text"][1] = False, False
    rows = [{**{k: v[i] for k, v in x.items()}, "labels": torch.tensor(i % 3)} for i in range(8)]
    loader = DataLoader(rows, batch_size=8)
    before = trainable_state(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ledger = Account(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=1.0)
    with private_training(
        model, optimizer, loader, ledger, max_grad_norm=1.0, grad_sample_mode=mode
    ) as session:
        for b in session.loader:
            session.optimizer.zero_grad()
            loss = session.criterion(logits(model, b), b["labels"])
            loss.backward()
            session.optimizer.step()
        assert session.engine.accountant.history == [(1.0, 1.0, 1)]
    unchanged = [n for n, v in trainable_state(model).items() if torch.equal(v, before[n])]
    assert not unchanged
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in build_model(tiny_run(fusion=fusion).model).named_parameters()
    ]  # hooks gone, no renamed parameters


def test_seed_preset_is_the_reference_design() -> None:
    cfg = tiny_run(preset="seed", text_encoder="builtin:bert-base").model
    assert cfg.image_encoder == "resnet50" and cfg.image_size == 224
    model = build_model(cfg)
    assert model.image.out_dim == 2048 and model.text.config.hidden_size == 768
    assert len(model.text.encoder.layer) == 12
    with torch.no_grad():
        x = batch(model, b=1)
        x["images"] = x["images"][:, :, :64, :64]  # any size works; keep the test fast
        assert logits(model, x).shape == (1, 3)
