"""The trainable set (what travels between sites and server) and the frozen part's fingerprint.

Only the trainable parameters are exchanged; the frozen part is identical at every site
(pretrained weights named in the run config, or a seeded CPU init) and its SHA-256 fingerprint
travels with every round, so a mismatch is caught before any training.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from common.errors import ConfigurationError


class TrainableMismatch(ConfigurationError):
    """Parameters that do not fit this model's trainable set (names or shapes)."""

    default_reason = "model-mismatch"


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in module order: exactly what travels."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of the trainable parameters on the CPU (the payload a site sends)."""
    return OrderedDict(
        (name, p.detach().to("cpu", copy=True))
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    expected = set(trainable_names(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TrainableMismatch(
            f"Trainable-parameter names do not match this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}. Server and site must use the same model settings "
            "(preset, fusion, trainable-text-layers, trainable-image-blocks)."
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise TrainableMismatch(
                    f"Parameter {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(params[name].shape)}."
                )
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
