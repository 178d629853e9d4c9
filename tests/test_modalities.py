"""The parameters a site cannot train, checked against autograd for every fusion mode."""

from __future__ import annotations

import pytest
import torch

from common.config import run_config_with
from common.model.fusion_model import FusionModel, build_model
from common.model.modalities import frozen, modality_combos, untrained_parameters
from common.model.trainable import trainable_names

IMAGE, TEXT, BOTH = (True, False), (False, True), (True, True)
COMBO_SETS = [{BOTH}, {IMAGE}, {TEXT}, {IMAGE, TEXT}, {BOTH, IMAGE}, {BOTH, TEXT}]


def tiny_model(fusion: str) -> FusionModel:
    cfg = run_config_with(
        {
            "preset": "tiny",
            "fusion": fusion,
            "trainable-text-layers": 1,
            "trainable-image-blocks": 1,
        }
    ).model
    return build_model(cfg)


def parameters_without_gradient(model: FusionModel, combos: set[tuple[bool, bool]]) -> set[str]:
    """Trainable parameters whose gradient is exactly zero after a batch of these combos."""
    torch.manual_seed(0)
    pattern = sorted(combos) * 4  # (B,) rows cycling through the combinations
    b = len(pattern)
    has_image = torch.tensor([c[0] for c in pattern])
    has_text = torch.tensor([c[1] for c in pattern])
    images = torch.randn(b, 3, 64, 64) * has_image.view(b, 1, 1, 1)  # a missing image is zeros
    input_ids = torch.randint(1000, 2000, (b, 12))
    attention_mask = torch.zeros(b, 12, dtype=torch.long)
    attention_mask[:, :6] = 1
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(images, input_ids, attention_mask, has_image, has_text)
    torch.nn.functional.cross_entropy(logits, torch.arange(b) % logits.shape[1]).backward()
    params = dict(model.named_parameters())
    return {n for n in trainable_names(model) if params[n].grad is None or not params[n].grad.any()}


@pytest.mark.parametrize("fusion", ["concat", "weighted", "attention"])
def test_untrained_set_is_exactly_what_autograd_cannot_reach(fusion: str) -> None:
    model = tiny_model(fusion)
    for combos in COMBO_SETS:
        expected = parameters_without_gradient(model, combos)
        assert set(untrained_parameters(model, combos)) == expected, (fusion, combos)


def test_known_sets_for_concat() -> None:
    model = tiny_model("concat")
    image_only = untrained_parameters(model, {IMAGE})
    assert (
        "fusion.text_norm.weight" in image_only
        and "fusion.missing_image.table.weight" in image_only
    )
    assert any(n.startswith("text.encoder.layer.1.") for n in image_only)
    assert not any(n.startswith(("image.", "fusion.proj", "head")) for n in image_only)
    assert untrained_parameters(model, {BOTH}) == [
        "fusion.missing_image.table.weight",
        "fusion.missing_text.table.weight",
    ]
    assert untrained_parameters(model, {BOTH, IMAGE, TEXT}) == []


def test_frozen_restores_requires_grad_and_combos() -> None:
    model = tiny_model("weighted")
    names = untrained_parameters(model, {IMAGE})
    with frozen(model, names):
        assert set(trainable_names(model)).isdisjoint(names)
    assert set(names) <= set(trainable_names(model))

    class R:
        def __init__(self, image: object, text: str) -> None:
            self.image, self.text = image, text

    assert modality_combos([R("a.png", ""), R(None, "x"), R("b.png", "")]) == {IMAGE, TEXT}
