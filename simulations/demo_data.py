"""Synthetic demo hospitals written in the real site format (PNG images + manifest.csv).

Three classes of chest X-ray-like cases: `normal`, `pneumonia` (patchy, textured opacity in one
lung) and `effusion` (a smooth bright fluid level at a lung base). Both modalities carry signal
and neither alone is enough: an image is non-diagnostic with some probability, and a report is
non-committal ("clinical correlation recommended") or hedged ("opacity, pneumonia versus
effusion") with some probability, independently, so fusing both beats either one.

Hospitals differ as real ones do: number of cases, label prevalence, scanner (contrast,
brightness, noise) and report phrasing.

Each case also has structured fields (`DEMO_TABULAR_FIELDS`, the run config's `tabular-fields`
for the demo): age (older patients with effusions), sex (no signal), temperature (fever with
pneumonia) and SpO2 (lower with pneumonia and effusion), each missing at a rate that differs per
hospital. They are drawn from a generator of their own after the images and reports, so a run
that declares no fields sees exactly the two-modality demo data.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEMO_CLASS_NAMES = ("normal", "pneumonia", "effusion")
IMAGE_PIXELS = 64
BASE_SIZES = (720, 510, 360, 600, 420, 300)  # rows per hospital, cycled
P_IMAGE_UNINFORMATIVE = 0.3
P_TEXT_UNINFORMATIVE = 0.4
P_TEXT_HEDGED = 0.2
# the demo's structured fields (run config tabular-fields) and, per class, each numeric one's
# mean and standard deviation: the overlap keeps them a hint, never a diagnosis by themselves
DEMO_TABULAR_FIELDS = "age:numeric:0:110;sex:categorical:F|M;temp:numeric:34:42;spo2:numeric:70:100"
FIELD_SIGNAL: dict[str, dict[str, tuple[float, float]]] = {
    "age": {"normal": (50.0, 18.0), "pneumonia": (55.0, 20.0), "effusion": (68.0, 14.0)},
    "temp": {"normal": (36.9, 0.5), "pneumonia": (38.2, 0.9), "effusion": (37.1, 0.6)},
    "spo2": {"normal": (97.0, 1.5), "pneumonia": (93.0, 3.0), "effusion": (94.5, 2.5)},
}
FIELD_RANGES = {"age": (0.0, 110.0), "temp": (34.0, 42.0), "spo2": (70.0, 100.0)}
MAX_MISSING = {"age": 0.05, "sex": 0.05, "temp": 0.35, "spo2": 0.5}  # per hospital: up to this

# Two phrasing styles (hospitals alternate), each with findings per class.
PHRASES: tuple[dict[str, tuple[str, ...]], ...] = (
    {
        "normal": (
            "lungs are clear",
            "no focal consolidation",
            "no acute cardiopulmonary process",
            "no pleural effusion or pneumothorax",
        ),
        "pneumonia": (
            "focal consolidation in the {side} lower lobe",
            "patchy airspace disease {side} base",
            "findings consistent with pneumonia",
            "infiltrate in the {side} lung",
        ),
        "effusion": (
            "{side} pleural effusion",
            "blunting of the {side} costophrenic angle",
            "layering fluid at the {side} base",
            "moderate effusion on the {side}",
        ),
    },
    {
        "normal": (
            "clear lung fields",
            "normal chest radiograph",
            "heart size normal lungs clear",
            "unremarkable study",
        ),
        "pneumonia": (
            "airspace opacity {side} lung concerning for infection",
            "{side} sided pneumonia",
            "consolidative opacity {side} lower zone",
            "bronchopneumonic changes {side}",
        ),
        "effusion": (
            "fluid in the {side} pleural space",
            "{side} effusion with meniscus sign",
            "small {side} pleural collection",
            "effusion {side} hemithorax",
        ),
    },
)
FILLER = (
    "portable ap view.",
    "pa and lateral views.",
    "comparison with prior study.",
    "patient rotated.",
    "support lines unchanged.",
    "",
)
NONCOMMITTAL = (
    "limited study, clinical correlation recommended.",
    "no significant change from prior.",
    "please correlate clinically.",
    "technically limited examination.",
)
HEDGED = (
    "opacity at the {side} base, pneumonia versus effusion.",
    "{side} basilar density, cannot exclude effusion or consolidation.",
)


@dataclass(frozen=True)
class Hospital:
    """How one synthetic hospital differs from the others."""

    name: str
    size: int
    prevalence: tuple[float, ...]  # per class, sums to 1
    contrast: float
    brightness: float
    noise: float
    style: int


def plan_hospitals(num_hospitals: int, seed: int, size_scale: float = 1.0) -> list[Hospital]:
    """Per-hospital size, prevalence, scanner and phrasing, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    hospitals = []
    for i in range(num_hospitals):
        prevalence = rng.dirichlet([4.0] * len(DEMO_CLASS_NAMES))
        hospitals.append(
            Hospital(
                name=f"hospital-{i}",
                size=max(12, round(BASE_SIZES[i % len(BASE_SIZES)] * size_scale)),
                prevalence=tuple(float(p) for p in prevalence),
                contrast=float(rng.uniform(0.75, 1.25)),
                brightness=float(rng.uniform(-0.08, 0.08)),
                noise=float(rng.uniform(0.02, 0.08)),
                style=i % len(PHRASES),
            )
        )
    return hospitals


def _lung_masks(yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    left = ((xx - 0.32) / 0.17) ** 2 + ((yy - 0.52) / 0.32) ** 2 < 1.0
    right = ((xx - 0.68) / 0.17) ** 2 + ((yy - 0.52) / 0.32) ** 2 < 1.0
    return left, right


def synth_image(
    label: str, side: str, strength: float, hospital: Hospital, rng: np.random.Generator
) -> np.ndarray:
    """A (64, 64) uint8 chest-like image showing the finding with the given strength in [0, 1]."""
    n = IMAGE_PIXELS
    yy: np.ndarray
    xx: np.ndarray
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    body = (((xx - 0.5) / 0.45) ** 2 + ((yy - 0.55) / 0.5) ** 2 < 1.0).astype(np.float32)
    img = 0.15 + 0.45 * body
    left, right = _lung_masks(yy, xx)
    lung = left if side == "left" else right
    img = np.where(left | right, 0.25, img)
    if label == "pneumonia":  # patchy, textured blotches inside one lung
        patches = np.zeros_like(img)
        for _ in range(rng.integers(4, 8)):
            cy, cx = (
                rng.uniform(0.45, 0.8),
                (0.32 if side == "left" else 0.68) + rng.uniform(-0.1, 0.1),
            )
            patches += np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.035**2)))
        texture = rng.uniform(0.5, 1.0, size=img.shape)
        img = img + strength * 0.55 * np.clip(patches, 0, 1) * texture * lung
    elif label == "effusion":  # smooth bright fluid filling the lung base
        level = 0.62 + rng.uniform(-0.05, 0.05)
        img = img + strength * 0.45 * (yy > level) * lung
    img = hospital.contrast * (img - 0.4) + 0.4 + hospital.brightness
    img = img + rng.normal(0.0, hospital.noise, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def synth_report(
    label: str, side: str, informative: str, hospital: Hospital, rng: np.random.Generator
) -> str:
    """A short radiology report; `informative` is 'yes', 'hedged' or 'no'."""
    filler = str(rng.choice(FILLER))
    if informative == "no":
        finding = str(rng.choice(NONCOMMITTAL))
    elif informative == "hedged" and label != "normal":
        finding = str(rng.choice(HEDGED)).format(side=side)
    else:
        finding = str(rng.choice(PHRASES[hospital.style][label])).format(side=side) + "."
    return f"{filler} {finding}".strip()


def write_hospital(folder: Path, hospital: Hospital, seed: int) -> Path:
    """Write one hospital's images and manifest.csv; return the manifest path."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, patient = [], 0
    for i in range(hospital.size):
        if i == 0 or rng.random() > 0.3:  # ~30% of patients have a second study
            patient += 1
        label = str(rng.choice(DEMO_CLASS_NAMES, p=hospital.prevalence))
        side = str(rng.choice(("left", "right")))
        strength = 0.05 if rng.random() < P_IMAGE_UNINFORMATIVE else float(rng.uniform(0.5, 1.0))
        u = rng.random()
        informative = (
            "no"
            if u < P_TEXT_UNINFORMATIVE
            else ("hedged" if u < P_TEXT_UNINFORMATIVE + P_TEXT_HEDGED else "yes")
        )
        name = f"images/{hospital.name}-{i:05d}.png"
        Image.fromarray(synth_image(label, side, strength, hospital, rng)).save(folder / name)
        rows.append(
            {
                "image": name,
                "text": synth_report(label, side, informative, hospital, rng),
                "label": label,
                "patient_id": f"{hospital.name}-p{patient:05d}",
            }
        )
    add_fields(rows, np.random.default_rng([seed, 27]))
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def add_fields(rows: list[dict[str, str]], rng: np.random.Generator) -> None:
    """Add the structured fields to each row (in place), with this hospital's missing rates."""
    missing = {name: float(rng.uniform(0.0, top)) for name, top in MAX_MISSING.items()}
    for row in rows:
        label = row["label"]
        for name, by_class in FIELD_SIGNAL.items():
            mean, sd = by_class[label]
            low, high = FIELD_RANGES[name]
            value = float(np.clip(rng.normal(mean, sd), low, high))
            row[name] = f"{value:.0f}" if name in ("age", "spo2") else f"{value:.1f}"
        row["sex"] = str(rng.choice(("F", "M")))
        for name, rate in missing.items():
            if rng.random() < rate:
                row[name] = ""


def write_demo_hospitals(
    root: Path, num_hospitals: int, seed: int = 0, size_scale: float = 1.0
) -> list[Path]:
    """Write `num_hospitals` folders `<root>/hospital-<i>/`; return their manifest paths."""
    manifests = []
    for i, hospital in enumerate(plan_hospitals(num_hospitals, seed, size_scale)):
        manifests.append(write_hospital(root / hospital.name, hospital, seed * 1000 + i))
        log.info("wrote %s: %d cases", hospital.name, hospital.size)
    return manifests
