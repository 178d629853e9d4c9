"""Image weights: a torchvision weight name comes from the torch hub cache, never from the network;
a random initialisation is announced loudly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

from common.model import encoders
from common.model.encoders import ModelLoadError, build_image_encoder


def test_weight_name_loads_the_hub_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet18()  # stands in for the downloaded ImageNet weights
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    encoder = build_image_encoder("resnet18", "IMAGENET1K_V1", seed=0)
    torch.testing.assert_close(encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_weight_name_missing_from_the_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="never downloads at run time"):
        build_image_encoder("resnet18", "IMAGENET1K_V1", seed=0)
    with pytest.raises(ModelLoadError, match="not a torchvision weight name of resnet18"):
        build_image_encoder("resnet18", "IMAGENET1K_V9", seed=0)


def test_random_initialisation_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="common.model.encoders"):
        encoders._WARNED_RANDOM.discard("resnet10")  # warned once per process
        build_image_encoder("resnet10", "", seed=0)
    assert "seeded random initialisation" in caplog.text
