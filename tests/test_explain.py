"""Per-case explanations: integrated gradients are complete (they sum to the logit's change from the
baseline) for every fusion mode; a missing modality gets no attribution, heatmap or tokens;
`fedfusion predict --explain` writes its page, its numbers and a heatmap per case with an image."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.data.manifest import read_manifest
from common.model.checkpoint import save_model
from common.model.fusion_model import build_model
from tests.conftest import tiny_run
from tools.cli import main
from tools.predict import Predictor, cases_dataset, load_predictor

pytest.importorskip("captum")

from tools.explain import explain_cases, integrated_gradients


def _predictor(tmp_path: Path, fusion: str) -> Predictor:
    model = build_model(tiny_run(fusion=fusion).model)
    with torch.no_grad():  # a head with some spread, so the logits differ from the baseline's
        model.head.weight.mul_(20)
    save_model(tmp_path / fusion, model)
    return load_predictor(tmp_path / fusion, "cpu")


@pytest.mark.parametrize("fusion", ["concat", "weighted", "attention"])
def test_integrated_gradients_are_complete(demo_root: Path, tmp_path: Path, fusion: str) -> None:
    predictor = _predictor(tmp_path, fusion)
    manifest, rows = read_manifest(demo_root / "hospital-0", predictor.class_names)
    item = cases_dataset(predictor, manifest, rows[:1])[0]
    case = {k: v.unsqueeze(0) for k, v in item.items() if k != "labels"}
    with torch.no_grad():
        target = int(predictor.model(**case)[0].argmax())
    # a random-init ResNet is rough along the path: the integral needs many steps to converge
    a = integrated_gradients(predictor.model, case, target, steps=256)
    change = a.logit - a.baseline_logit
    with torch.no_grad():  # F(x) is the model's own logit
        assert a.logit == pytest.approx(float(predictor.model(**case)[0, target]), abs=1e-5)
    assert abs(change) > 1e-1
    assert sum(a.totals.values()) == pytest.approx(change, rel=0.05)
    assert a.delta == pytest.approx(abs(sum(a.totals.values()) - change), abs=1e-4)


def test_a_missing_modality_gets_no_attribution(demo_root: Path, tmp_path: Path) -> None:
    predictor = _predictor(tmp_path, "weighted")
    manifest, rows = read_manifest(demo_root / "hospital-0", predictor.class_names)
    cases = [replace(rows[0], image=None), replace(rows[1], text=""), rows[2]]
    out = tmp_path / "explain"
    explained = explain_cases(predictor, cases_dataset(predictor, manifest, cases), out, steps=16)
    no_image, no_text, both = explained
    assert no_image.heatmap is None and float(no_image.attribution.image.abs().sum()) == 0.0
    assert no_image.with_modalities["both"] == pytest.approx(no_image.with_modalities["text"])
    assert no_text.tokens == [] and no_text.attribution.totals["text"] == pytest.approx(
        0.0, abs=1e-7
    )
    assert both.heatmap and (out / both.heatmap).read_bytes()[:4] == b"\x89PNG"
    assert both.tokens and all(not t.startswith("[") for t, _ in both.tokens)
    assert both.weights is not None and sum(both.weights.values()) == pytest.approx(1.0)
    page = (out / "explanations.html").read_text()
    assert f"Row {both.line}" in page and "no image" in page and "no report" in page
    numbers = json.loads((out / "explanations.json").read_text())
    assert [n["line"] for n in numbers] == [c.line for c in explained]


def test_predict_explain_command(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _predictor(tmp_path, "concat")
    out = tmp_path / "why"
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "concat"),
            "--manifest",
            str(demo_root / "hospital-2"),
            "--out",
            str(tmp_path / "p.csv"),
            "--device",
            "cpu",
            "--explain",
            str(out),
            "--explain-max",
            "2",
            "--ig-steps",
            "8",
        ]
    )
    assert code == 0
    assert "2 explanation(s) written" in capsys.readouterr().out
    assert len(list(out.glob("case-*-image.png"))) == 2 and (out / "explanations.html").is_file()


def test_structured_fields_are_explained_and_a_missing_one_gets_nothing(
    demo_root: Path, tmp_path: Path
) -> None:
    from tests.test_tabular_training import SCHEMA, with_fields

    model = build_model(tiny_run(fusion="concat", tabular_fields=SCHEMA).model)
    with torch.no_grad():
        model.head.weight.mul_(20)
    save_model(tmp_path / "three", model)
    predictor = load_predictor(tmp_path / "three", "cpu")
    site = with_fields(
        demo_root / "hospital-0", tmp_path / "site", keep=("image", "text", "tabular")
    )
    manifest, rows = read_manifest(site, predictor.class_names, fields=model.config.tabular)
    # no image: a random-init ResNet is rough along the path, and the fields are what is tested
    cases = [
        replace(rows[0], image=None, tabular=(64.0, None)),
        replace(rows[1], tabular=(None, None)),
    ]
    dataset = cases_dataset(predictor, manifest, cases)
    item = dataset[0]
    case = {k: v.unsqueeze(0) for k, v in item.items() if k != "labels"}
    a = integrated_gradients(predictor.model, case, 0, steps=128)
    assert a.tabular is not None and a.tabular[1] == 0.0  # sex is missing: no attribution
    assert abs(float(a.tabular[0])) > 0  # age is what it adds over an unknown age
    assert sum(a.totals.values()) == pytest.approx(a.logit - a.baseline_logit, abs=5e-3)

    explained = explain_cases(predictor, dataset, tmp_path / "why", steps=4)
    assert [name for name, _ in explained[0].fields] == ["age", "sex"]
    assert set(explained[0].with_modalities) == {"both", "image", "text", "tabular", "no-tabular"}
    assert explained[0].heatmap is None
    assert all(v == 0.0 for _, v in explained[1].fields)  # no field at all: masked
    numbers = json.loads((tmp_path / "why" / "explanations.json").read_text())
    assert set(numbers[0]["field_attributions"]) == {"age", "sex"}
    assert "fields only" in (tmp_path / "why" / "explanations.html").read_text()
