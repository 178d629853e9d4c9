"""Saving and loading models and parameter sets as safetensors, loadable without Flower.

A saved model is a folder with `model.safetensors` (the full state: frozen + trainable) and
`model.json` (the resolved model config, the frozen-part fingerprint, the trainable names and the
parameter counts).
`load_model(folder)` rebuilds the architecture from the config and loads the state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from common.config import ModelConfig
from common.files import atomic_write_bytes
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import frozen_fingerprint, parameter_counts, trainable_names

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


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """`model.json`: what rebuilds a saved model, and what it is."""

    config: ModelConfig  # resolved
    frozen_fingerprint: str
    trainable: list[str]  # the trainable parameter names, in module order
    parameters: dict[str, int]  # {"total": n, "trainable": n}

    def to_json(self) -> dict[str, Any]:
        """The JSON object of model.json."""
        return {
            "model_config": self.config.to_json_dict(),
            "frozen_fingerprint": self.frozen_fingerprint,
            "trainable": self.trainable,
            "parameters": self.parameters,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelCard:
        """Inverse of `to_json`."""
        return cls(
            config=ModelConfig.from_json_dict(d["model_config"]),
            frozen_fingerprint=d["frozen_fingerprint"],
            trainable=list(d["trainable"]),
            parameters=dict(d.get("parameters", {})),
        )


def save_model(folder: Path, model: FusionModel) -> None:
    """Write model.safetensors + model.json into `folder`."""
    save_tensors(folder / MODEL_WEIGHTS, {k: v.clone() for k, v in model.state_dict().items()})
    card = ModelCard(
        config=model.config,
        frozen_fingerprint=frozen_fingerprint(model),
        trainable=trainable_names(model),
        parameters=parameter_counts(model),
    )
    atomic_write_bytes(folder / MODEL_CONFIG, json.dumps(card.to_json(), indent=2).encode())


def read_model_card(folder: Path) -> ModelCard | None:
    """The model.json of a saved model folder, or None if it has none."""
    path = folder / MODEL_CONFIG
    return ModelCard.from_json(json.loads(path.read_text())) if path.is_file() else None


def load_model(folder: Path) -> FusionModel:
    """Rebuild a saved model from its folder (no Flower needed)."""
    card = read_model_card(folder)
    if card is None:
        raise FileNotFoundError(
            f"{folder} holds no {MODEL_CONFIG}: it is not a saved FedFusion model folder "
            "(the server writes one to outputs/<run-name>/ at the end of a run)."
        )
    model = build_model(card.config)
    model.load_state_dict(load_tensors(folder / MODEL_WEIGHTS), strict=True)
    model.eval()
    return model
