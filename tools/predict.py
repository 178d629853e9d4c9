"""Use a trained model without Flower: class probabilities for one case or for a manifest of cases.

The run folder's `model.safetensors` + `model.json` rebuild the model (`common.model.checkpoint`);
cases go through the same reading, tokenising and masking of a missing modality as in training
(`common.data`), and labelled cases get the same metrics as a site's evaluation
(`common.training.loop.metrics_from_logits`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from common.data.dataset import ManifestDataset
from common.data.manifest import Row, read_cases
from common.errors import ConfigurationError
from common.model.checkpoint import MODEL_CONFIG, load_model
from common.model.encoders import load_tokenizer
from common.model.fusion_model import FusionModel
from common.training.loop import metrics_from_logits, pick_device, predict_logits
from common.training.metrics import Metrics

log = logging.getLogger(__name__)


class PredictError(ConfigurationError):
    """A prediction cannot be made; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Predictor:
    """A trained model ready to predict: the model, its tokenizer and device."""

    model: FusionModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device

    @property
    def class_names(self) -> tuple[str, ...]:
        """The labels, in the order of the probabilities."""
        return self.model.config.class_names


@dataclass(frozen=True)
class Predictions:
    """Class probabilities (N, C) for the rows of a manifest, and metrics over its labelled rows."""

    rows: list[Row]
    probs: np.ndarray  # (N, C)
    metrics: Metrics | None  # None when no row has a label


def load_predictor(run_dir: Path, device: str = "auto") -> Predictor:
    """Load the final model of a run folder (or any folder written by `save_model`)."""
    if not run_dir.is_dir():
        raise PredictError(
            f"{run_dir} is not a folder. Pass a run folder, e.g. "
            "--model outputs/<run-name> (the server writes one per run)."
        )
    if not (run_dir / MODEL_CONFIG).is_file():
        raise PredictError(
            f"{run_dir} holds no {MODEL_CONFIG}: the run has not finished (the "
            "final model is written when the run ends) or this is not a run folder."
        )
    model = load_model(run_dir)
    target = pick_device(device)
    return Predictor(model.to(target), load_tokenizer(model.config.text_encoder), target)


def cases_dataset(predictor: Predictor, manifest: Path, rows: list[Row]) -> ManifestDataset:
    """The model's inputs for `rows` (paths relative to `manifest`), as in training."""
    cfg = predictor.model.config
    return ManifestDataset(
        manifest,
        rows,
        cfg.class_names,
        predictor.tokenizer,
        cfg.image_size,
        cfg.max_text_length,
        fields=cfg.tabular,
    )


def predict_rows(
    predictor: Predictor, manifest: Path, rows: list[Row], batch_size: int = 64
) -> Predictions:
    """Probabilities for `rows` (paths relative to `manifest`); metrics over the labelled ones."""
    loader = DataLoader(cases_dataset(predictor, manifest, rows), batch_size=batch_size)
    logits, labels = predict_logits(predictor.model, loader, predictor.device, desc="predict")
    probs = torch.softmax(logits, dim=-1).numpy()
    known = labels >= 0
    metrics = metrics_from_logits(logits[known], labels[known]) if bool(known.any()) else None
    return Predictions(rows, probs, metrics)


def predict_manifest(predictor: Predictor, path: Path, batch_size: int = 64) -> Predictions:
    """Read a manifest (labels optional) and predict every row."""
    manifest, rows = read_cases(path, predictor.class_names, fields=predictor.model.config.tabular)
    return predict_rows(predictor, manifest, rows, batch_size)


def case_row(image: Path | None, text: str) -> Row:
    """One case as a manifest row; either modality may be missing, not both."""
    text = text.strip()
    if image is None and not text:
        raise PredictError("A case needs an image (--image), a report text (--text), or both.")
    if image is not None and not image.is_file():
        raise PredictError(f"Image {image} does not exist; pass the path of a PNG/JPEG/DICOM file.")
    return Row(
        line=0,
        image=image.resolve() if image else None,
        text=text,
        label="",
        patient_id="case",
        split=None,
    )


def predict_case(predictor: Predictor, image: Path | None, text: str) -> dict[str, float]:
    """Class name -> probability for one case; either modality may be missing, not both."""
    result = predict_rows(predictor, Path.cwd() / "case", [case_row(image, text)])
    return dict(zip(predictor.class_names, (float(p) for p in result.probs[0]), strict=True))


def write_predictions_csv(
    path: Path, predictions: Predictions, class_names: tuple[str, ...]
) -> None:
    """One CSV row per case: manifest line, image, label, predicted class, probability per class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["line", "image", "label", "prediction", *(f"p_{c}" for c in class_names)])
        for row, p in zip(predictions.rows, predictions.probs, strict=True):
            writer.writerow(
                [
                    row.line,
                    str(row.image or ""),
                    row.label,
                    class_names[int(p.argmax())],
                    *(f"{v:.6f}" for v in p),
                ]
            )
