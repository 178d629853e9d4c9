"""Saving and loading models and parameter sets as safetensors, loadable without Flower.

A saved model is a folder with `model.safetensors` (the full state: frozen + trainable) and
`model.json` (the resolved model config, the frozen-part fingerprint, the trainable names and the
parameter counts).
`load_model(folder)` rebuilds the architecture from the config and loads the state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from common.config import ModelConfig
from common.files import atomic_write_bytes
from common.model import (
    FusionModel,
    build_model,
    frozen_fingerprint,
    parameter_counts,
    trainable_names,
)

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save named tensors as safetensors (atomically)."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load named tensors from a safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"No parameter file at {path}.")
    return load_file(str(path))


def save_model(folder: Path, model: FusionModel) -> None:
    """Write model.safetensors + model.json into `folder`."""
    save_tensors(folder / MODEL_WEIGHTS, {k: v.clone() for k, v in model.state_dict().items()})
    meta = {
        "model_config": model.config.to_json_dict(),
        "frozen_fingerprint": frozen_fingerprint(model),
        "trainable": trainable_names(model),
        "parameters": parameter_counts(model),  # {"total": n, "trainable": n}
    }
    atomic_write_bytes(folder / MODEL_CONFIG, json.dumps(meta, indent=2).encode())


def load_model(folder: Path) -> FusionModel:
    """Rebuild a saved model from its folder (no Flower needed)."""
    meta_path = folder / MODEL_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {MODEL_CONFIG}: it is not a saved FedFusion model folder "
            "(the server writes one to outputs/<run-name>/ at the end of a run).")
    meta = json.loads(meta_path.read_text())
    model = build_model(ModelConfig.from_json_dict(meta["model_config"]))
    model.load_state_dict(load_tensors(folder / MODEL_WEIGHTS), strict=True)
    model.eval()
    return model
