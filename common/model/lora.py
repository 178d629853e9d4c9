"""LoRA adapters on the text encoder (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), via peft: a trainable set of a few kilobytes per layer that adapts the
attention of the top text layers (run config `lora-rank`, `lora-layers`).

The adapters are added when the model is built, on the CPU, eagerly (no lazy parameters): the
site later moves the whole model to its device before its optimizer and Opacus see it, the same
order as every other trainable parameter. (Opacus issue 820 is adapters materialised after
Opacus registered its hooks: they never train; tests/test_lora.py checks that every adapter
tensor changes under DP-SGD through the site's own round.)
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model

from common.errors import ConfigurationError
from common.model.encoders import text_layers

# the attention projections LoRA adapts (query and value, as the LoRA paper): BERT/RoBERTa names,
# then DistilBERT's
LORA_TARGETS = (("query", "value"), ("q_lin", "v_lin"))
LORA_ALPHA_PER_RANK = 2  # alpha = 2 x rank: the adapters' scale alpha / rank is 2 at any rank


def add_text_lora(text: torch.nn.Module, *, rank: int, layers: int, seed: int) -> None:
    """Add rank-`rank` adapters to query and value of the top `layers` layers of `text` (in place).

    Adapter B starts at zero, so the model's output is unchanged until it trains; A is drawn from
    `seed`, so every site starts from the same adapters. Only the adapters are left trainable.
    """
    stack = text_layers(text)
    if rank < 1:
        raise ConfigurationError(f"lora-rank must be at least 1 to add adapters, got {rank}.")
    if not 1 <= layers <= len(stack):
        raise ConfigurationError(
            f"lora-layers is {layers} but the text encoder has {len(stack)} "
            f"layers: choose 1 to {len(stack)}."
        )
    names = {n.rsplit(".", 1)[-1] for n, _ in stack[0].named_modules()}
    targets = next((t for t in LORA_TARGETS if set(t) <= names), None)
    if targets is None:
        raise ConfigurationError(
            f"{type(text).__name__}'s layers have none of the attention "
            f"projections LoRA adapts ({LORA_TARGETS})."
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA_PER_RANK * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in stack[len(stack) - layers :]:
            inject_adapter_in_model(config, layer)


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters."""
    return [n for n, _ in model.named_parameters() if ".lora_" in n]
