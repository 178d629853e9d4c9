"""The fusion model: ResNet image encoder + BERT-family text encoder [+ tabular encoder] + fusion
+ classifier head.

The tabular encoder (`common.model.tabular`) exists only when the run declares structured fields
(`tabular-fields`); it is built after the head, so a model without fields is the two-modality
model: the same parameter names, the same seeded values, the same outputs.

Read top to bottom: the model, its builder, and the choice of its trainable set (what travels;
`common.model.trainable`). The model's configuration and its presets are `common.config.
ModelConfig` and `PRESETS`.

BatchNorm is never trained (Opacus cannot train it, and batch statistics would mix samples):
every BatchNorm stays in eval mode and acts as a fixed affine map with its stored statistics.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from transformers import PreTrainedModel

from common.config import ModelConfig
from common.data.tabular import TABULAR_KEYS
from common.model.encoders import (
    IMAGE_STAGES,
    ImageEncoder,
    ModelLoadError,
    build_image_encoder,
    build_text_encoder,
    text_layers,
)
from common.model.fusion import FUSIONS, Features
from common.model.lora import add_text_lora
from common.model.tabular import TabularEncoder


class FusionModel(nn.Module):
    """Image + text [+ structured fields] -> class logits (B, num_classes)."""

    def __init__(self, config: ModelConfig, image: ImageEncoder, text: PreTrainedModel) -> None:
        super().__init__()
        self.config = config
        self.image = image
        self.text = text
        fusion_cls = FUSIONS[config.fusion]
        tabular_dim = config.fusion_dim if config.tabular else 0  # phi(M_tab): (B, F, fusion_dim)
        self.fusion = fusion_cls(
            image.out_dim, text.config.hidden_size, config.fusion_dim, tabular_dim=tabular_dim
        )
        self.head = nn.Linear(config.fusion_dim, len(config.class_names))
        self.tabular = TabularEncoder(config.tabular, tabular_dim) if tabular_dim else None

    def forward(
        self,
        images: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        has_image: torch.Tensor,  # (B,) bool
        has_text: torch.Tensor,  # (B,) bool
        **tabular: torch.Tensor,  # the fields' tensors (common.data.tabular.TABULAR_KEYS)
    ) -> torch.Tensor:
        features = self.encode(images, input_ids, attention_mask, has_image, has_text, **tabular)
        return self.classify(features)

    def encode(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        has_image: torch.Tensor,
        has_text: torch.Tensor,
        **tabular: torch.Tensor,
    ) -> Features:
        """The encoders' token outputs and the modality masks (the inputs of the fusion)."""
        image_tokens = self.image(images)  # (B, Ni, Di)
        text_tokens = self.text(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        features = Features(image_tokens, text_tokens, attention_mask.bool(), has_image, has_text)
        return self.with_tabular(features, tabular)

    def with_tabular(self, features: Features, tabular: dict[str, torch.Tensor]) -> Features:
        """`features` with the structured fields' tokens (B, F, D) when the model has fields."""
        if self.tabular is None:
            if tabular:
                raise ValueError(
                    f"the batch holds structured fields {sorted(tabular)} but the model "
                    "declares none (run config key tabular-fields)."
                )
            return features
        if set(tabular) != set(TABULAR_KEYS):
            raise ValueError(
                f"the model declares structured fields, so a batch needs {list(TABULAR_KEYS)}; "
                f"got {sorted(tabular)}. Read the data with the run's tabular-fields."
            )
        tokens = self.tabular(
            tabular["tabular_numeric"], tabular["tabular_categorical"], tabular["tabular_missing"]
        )
        return features._replace(tabular_tokens=tokens, has_tabular=tabular["has_tabular"])

    def classify(self, features: Features) -> torch.Tensor:
        """Fusion + head: encoder outputs -> class logits (B, num_classes)."""
        logits: torch.Tensor = self.head(self.fusion(features))  # a module's call is typed Any
        return logits

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
    image = build_image_encoder(config.image_encoder, config.image_weights, config.seed)
    text = build_text_encoder(config.text_encoder, config.seed).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FusionModel(config, image, text)
    if config.lora_rank:
        add_text_lora(
            model.text, rank=config.lora_rank, layers=config.lora_layers, seed=config.seed
        )
    configure_trainable(model, config.trainable_text_layers, config.trainable_image_blocks)
    return model


def configure_trainable(model: FusionModel, text_layers_n: int, image_blocks_n: int) -> None:
    """Train fusion + head (+ the tabular encoder), any LoRA adapters, the top `text_layers_n`
    text layers and top `image_blocks_n` image stages.

    Text embeddings are always frozen (trainable position embeddings break Opacus, issue 841).
    In a trainable image stage the convolutions train and the BatchNorms stay frozen.
    """
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.tabular is not None:
        model.tabular.requires_grad_(True)
    for name, p in model.text.named_parameters():
        if ".lora_" in name:  # the adapters (common.model.lora); the layers under them stay frozen
            p.requires_grad_(True)
    layers = text_layers(model.text)
    if text_layers_n > len(layers):
        raise ModelLoadError(
            f"trainable-text-layers is {text_layers_n} but the text encoder has only "
            f"{len(layers)} layers."
        )
    for layer in layers[len(layers) - text_layers_n :]:
        layer.requires_grad_(True)
    for stage in IMAGE_STAGES[len(IMAGE_STAGES) - image_blocks_n :] if image_blocks_n else ():
        for module in getattr(model.image, stage).modules():
            if isinstance(module, nn.Conv2d):
                module.requires_grad_(True)
