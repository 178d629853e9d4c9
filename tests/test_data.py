"""Site data: manifest problems named by row, patient-level split, the dataset, the demo data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from torch.utils.data import DataLoader

from common.data.dataset import ManifestDataset
from common.data.images import ImageReadError
from common.data.manifest import ManifestError, Row, read_manifest, split_by_patient
from common.model.encoders import load_tokenizer
from common.training.metrics import macro_auroc
from simulations.demo_data import DEMO_CLASS_NAMES, plan_hospitals

CLASSES = ("normal", "pneumonia", "effusion")


def write_csv(folder: Path, rows: list[dict[str, str]], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "text", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def png(folder: Path, name: str) -> str:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(folder / "img" / name)
    return f"img/{name}"


def test_every_problem_is_reported_with_its_row(tmp_path: Path) -> None:
    ok = png(tmp_path, "a.png")
    manifest = write_csv(
        tmp_path,
        [
            {"image": ok, "text": "clear", "label": "normal"},  # line 2: fine
            {"image": "img/missing.png", "text": "x", "label": "normal"},  # line 3
            {"image": "", "text": "", "label": "normal"},  # line 4
            {"image": ok, "text": "x", "label": "pneumonai"},  # line 5
            {"image": ok, "text": "x", "label": "normal", "split": "test"},  # line 6
        ],
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, CLASSES)
    problems = info.value.problems
    assert len(problems) == 4
    assert re.search(r"manifest.csv:3: image file .*missing.png does not exist", problems[0])
    assert problems[1].endswith("manifest.csv:4: empty row (no image and no text).")
    assert "manifest.csv:5: unknown label 'pneumonai'" in problems[2]
    assert "manifest.csv:6: unknown split 'test'" in problems[3]


def test_empty_and_malformed_manifests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="has no rows"):
        read_manifest(write_csv(tmp_path / "empty", []), CLASSES)
    (tmp_path / "nocol").mkdir()
    (tmp_path / "nocol" / "manifest.csv").write_text("image,label\nx.png,normal\n")
    with pytest.raises(ManifestError, match=r"manifest.csv:1: missing column\(s\) \['text'\]"):
        read_manifest(tmp_path / "nocol", CLASSES)
    with pytest.raises(ManifestError, match="no such file or folder"):
        read_manifest(tmp_path / "absent", CLASSES)
    (tmp_path / "none").mkdir()
    with pytest.raises(ManifestError, match=r"no manifest\.csv or manifest\.jsonl"):
        read_manifest(tmp_path / "none", CLASSES)


def test_jsonl_manifest_with_missing_modalities(tmp_path: Path) -> None:
    image = png(tmp_path, "a.png")
    lines = [
        {"image": image, "text": "", "label": "normal", "patient_id": "p1"},
        {"image": None, "text": "effusion left", "label": "effusion", "patient_id": "p2"},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    manifest, rows = read_manifest(tmp_path, CLASSES)
    assert manifest == path
    assert rows[0].image == tmp_path / image and rows[0].text == ""
    assert rows[1].image is None and rows[1].label == "effusion"
    path.write_text("{not json\n")
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:1: not valid JSON"):
        read_manifest(tmp_path, CLASSES)


def _rows(n: int, per_patient: int = 2) -> list[Row]:
    return [Row(i + 2, None, "t", "normal", f"p{i // per_patient}", None) for i in range(n)]


def test_split_keeps_each_patient_on_one_side_and_is_seeded() -> None:
    rows = _rows(100, per_patient=3)
    train, val = split_by_patient(rows, 0.2, seed=7)
    assert len(train) + len(val) == 100
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}
    assert 0.1 < len(val) / 100 < 0.3
    assert split_by_patient(rows, 0.2, seed=7) == (train, val)
    assert split_by_patient(rows, 0.2, seed=8) != (train, val)


def test_split_column_wins_and_pulls_the_patient_along() -> None:
    rows = [*_rows(10), Row(99, None, "t", "normal", "p0", "val")]
    _train, val = split_by_patient(rows, 0.01, seed=0)
    assert {r.line for r in val if r.patient_id == "p0"} == {2, 3, 99}


def test_dataset_items_and_unreadable_image(tmp_path: Path) -> None:
    good = png(tmp_path, "a.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    manifest = write_csv(
        tmp_path,
        [
            {"image": good, "text": "left effusion", "label": "effusion"},
            {"image": "", "text": "clear", "label": "normal"},
            {"image": "img/bad.png", "text": "", "label": "normal"},
            {"image": good, "text": "", "label": "pneumonia"},
        ],
    )
    _, rows = read_manifest(manifest, CLASSES)
    tok = load_tokenizer("builtin:tiny")
    ds = ManifestDataset(manifest, rows, CLASSES, tok, image_size=16, max_text_length=12)
    item = ds[0]
    assert item["images"].shape == (3, 16, 16) and item["input_ids"].shape[0] <= 12
    assert item["labels"].item() == 2 and item["has_image"] and item["has_text"]
    assert not ds[1]["has_image"] and ds[1]["images"].abs().sum() == 0
    assert ds[1]["has_text"] and not ds[3]["has_text"] and ds[3]["labels"].item() == 1
    with pytest.raises(
        ImageReadError, match=r"manifest.csv:4: .*bad.png is not a readable PNG/JPEG image"
    ):
        ds[2]
    # from a worker process too: the loader re-raises it by type, and the site explains the error
    with pytest.raises(ImageReadError, match=r"manifest.csv:4: .*bad.png"):
        list(DataLoader(ds, batch_size=4, num_workers=1))


def test_demo_hospitals_differ() -> None:
    hospitals = plan_hospitals(3, seed=0)
    assert len({h.size for h in hospitals}) == 3
    assert len({h.style for h in hospitals}) == 2
    assert len({round(h.contrast, 3) for h in hospitals}) == 3
    prevalences = np.array([h.prevalence for h in hospitals])
    np.testing.assert_allclose(prevalences.sum(axis=1), 1.0)
    assert np.ptp(prevalences, axis=0).max() > 0.1


def _features(root: Path) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Hand-made image features, report texts, labels and patient groups of all hospitals."""
    image_feats, texts, labels, groups = [], [], [], []
    for manifest in sorted(root.glob("hospital-*/manifest.csv")):
        for row in csv.DictReader(manifest.open()):
            img = np.asarray(Image.open(manifest.parent / row["image"]), dtype=np.float32) / 255
            lungs = [img[30:55, 12:30], img[30:55, 34:52]]
            feats = []
            for lung in lungs:  # brightness of the base, texture of the middle
                feats += [
                    lung[12:].mean() - lung[:8].mean(),
                    np.abs(np.diff(lung, axis=1)).mean(),
                    lung.std(),
                ]
            image_feats.append(feats)
            texts.append(row["text"])
            labels.append(DEMO_CLASS_NAMES.index(row["label"]))
            groups.append(row["patient_id"])
    return np.array(image_feats), texts, np.array(labels), np.array(groups)


def test_demo_data_needs_both_modalities(demo_root: Path) -> None:
    """Both modalities carry signal and fusing them beats either alone (simple reference models)."""
    image, texts, y, groups = _features(demo_root)
    words = CountVectorizer(binary=True).fit_transform(texts).toarray()
    image = (image - image.mean(0)) / image.std(0)

    def auroc(x: np.ndarray) -> float:
        probs = cross_val_predict(
            LogisticRegression(max_iter=2000),
            x,
            y,
            groups=groups,
            cv=GroupKFold(n_splits=4),
            method="predict_proba",
        )
        return macro_auroc(y, probs)

    image_only, text_only, both = auroc(image), auroc(words), auroc(np.hstack([image, words]))
    assert image_only > 0.65 and text_only > 0.65
    assert both > max(image_only, text_only) + 0.03


def test_reports_are_padded_to_the_longest_and_cut_at_max_text_length(tmp_path: Path) -> None:
    manifest = write_csv(
        tmp_path,
        [
            {"image": "", "text": "clear", "label": "normal"},
            {
                "image": "",
                "text": "left pleural effusion with basal atelectasis",
                "label": "effusion",
            },
        ],
    )
    _, rows = read_manifest(manifest, CLASSES)
    tok = load_tokenizer("builtin:tiny")
    longest = len(tok(rows[1].text)["input_ids"])  # with [CLS] and [SEP]
    wide = ManifestDataset(manifest, rows, CLASSES, tok, image_size=16, max_text_length=512)
    assert wide[0]["input_ids"].shape == (longest,) and wide[0]["attention_mask"].sum() == 3
    cut = ManifestDataset(manifest, rows, CLASSES, tok, image_size=16, max_text_length=4)
    assert cut[1]["input_ids"].shape == (4,) and cut[1]["attention_mask"].sum() == 4
