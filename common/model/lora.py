"""LoRA adapters on the text encoder (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), via peft: a trainable set a few hundred kilobytes large that adapts every layer.

The model must be on its training device before the adapters are added: peft adapters added on
the CPU and moved afterwards train silently wrong under Opacus (opacus issue 820). Not yet a
run-config option: the traffic benchmark uses it to size the update it would send.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from common.errors import ConfigurationError
from common.model.fusion_model import FusionModel

LORA_TARGETS = ("query", "value")  # BERT attention projections (DESIGN.md: trains under Opacus)


def add_text_lora(model: FusionModel, *, rank: int, alpha: int, device: torch.device,
                  seed: int = 0) -> FusionModel:
    """Move `model` to `device`, then wrap its text encoder with LoRA adapters (trainable).

    The rest of the trainable set (fusion + head, any trainable layers) stays as configured;
    the adapters' initialisation is seeded so every site starts from the same one.
    """
    if rank < 1:
        raise ConfigurationError(f"LoRA rank must be at least 1, got {rank}.")
    model.to(device)  # before get_peft_model (opacus issue 820)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                        bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.text = get_peft_model(model.text, config)
    for name, p in model.named_parameters():  # peft freezes everything but the adapters
        if not name.startswith("text.") and name in trainable:
            p.requires_grad_(True)
    return model


def adapter_names(model: FusionModel) -> list[str]:
    """Names of the LoRA adapter parameters."""
    return [n for n, _ in model.named_parameters() if ".lora_" in n]
