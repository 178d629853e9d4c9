"""Modality contributions: the ablation equals a forward with the modality masked by hand, the
weighted fusion's weights are read from the state, a site's policy withholds the ablation, and the
report says how much the model relies on the report."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from client.app import evaluate_content
from client.evaluation import evaluate_round
from client.state import SiteState
from common import protocol as R
from common.data.dataset import ManifestDataset
from common.data.manifest import read_manifest
from common.model.contributions import masked, modality_weights, reliance
from common.model.encoders import load_tokenizer
from common.model.fusion_model import build_model
from common.model.trainable import trainable_state
from common.runfolder import HistoryLine, SiteRound
from common.training.ablation import evaluate_with_ablation
from common.training.loop import metrics_from_logits
from common.views.plots import plot_ablation, plot_modality_weights, write_plots
from tests.conftest import hospital, request, tiny_run
from tools.report import RunRecords, modality_sentence, report_blocks
from tools.report_format import to_markdown


def _dataset(demo_root: Path, run, drop_text_every: int = 4) -> ManifestDataset:
    """Hospital 0's rows, every `drop_text_every`-th without its report, one without its image."""
    manifest, rows = read_manifest(demo_root / "hospital-0", run.model.class_names)
    rows = [replace(r, text="") if i % drop_text_every == 0 else r for i, r in enumerate(rows[:40])]
    rows[1] = replace(rows[1], image=None)
    m = run.model
    return ManifestDataset(
        manifest,
        rows,
        m.class_names,
        load_tokenizer(m.text_encoder),
        m.image_size,
        m.max_text_length,
    )


@pytest.mark.parametrize("fusion", ["concat", "weighted", "attention"])
def test_ablation_equals_a_forward_with_the_modality_masked(demo_root: Path, fusion: str) -> None:
    run = tiny_run(demo_root, fusion=fusion)
    model = build_model(run.model).eval()
    data = _dataset(demo_root, run)
    metrics, ablation = evaluate_with_ablation(
        model, DataLoader(data, batch_size=16), torch.device("cpu")
    )
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    labels = batch.pop("labels")
    both = batch["has_image"] & batch["has_text"]
    assert ablation.num_examples == int(both.sum()) < len(data)
    with torch.no_grad():
        full = model(**batch)
        image_only = model(**{**batch, "has_text": torch.zeros_like(batch["has_text"])})
        text_only = model(**{**batch, "has_image": torch.zeros_like(batch["has_image"])})
    want = metrics_from_logits(full, labels)  # one batch of all rows: float rounding differs
    assert dataclasses.asdict(metrics) == pytest.approx(dataclasses.asdict(want), rel=1e-5)
    for got, logits in (
        (ablation.both, full),
        (ablation.image, image_only),
        (ablation.text, text_only),
    ):
        want = metrics_from_logits(logits[both], labels[both])
        assert got.accuracy == pytest.approx(want.accuracy) and got.loss == pytest.approx(want.loss)
        assert got.auroc == pytest.approx(want.auroc)
    # masking changes the prediction (the ablation measures something)
    assert not torch.allclose(full[both], image_only[both])


def test_masked_keeps_only_the_named_modality(demo_root: Path) -> None:
    run = tiny_run(demo_root)
    model = build_model(run.model)
    batch = next(iter(DataLoader(_dataset(demo_root, run), batch_size=8)))
    batch.pop("labels")
    f = model.encode(**batch)
    assert not masked(f, "image").has_text.any() and torch.equal(
        masked(f, "image").has_image, f.has_image
    )
    assert not masked(f, "text").has_image.any() and torch.equal(
        masked(f, "text").has_text, f.has_text
    )
    with pytest.raises(ValueError):
        masked(f, "audio")


def test_weighted_fusion_weights_from_the_trainable_state(demo_root: Path) -> None:
    model = build_model(tiny_run(demo_root, fusion="weighted").model)
    with torch.no_grad():
        model.fusion.logits.table.weight.copy_(torch.tensor([[0.3, -1.2]]))
    weights = modality_weights(trainable_state(model))
    want = model.fusion.modality_weights().tolist()
    assert [weights["image"], weights["text"]] == pytest.approx(want)
    assert weights["image"] == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert modality_weights(trainable_state(build_model(tiny_run(demo_root).model))) is None


def test_reliance_is_the_share_of_above_chance_auroc() -> None:
    assert reliance(0.9, 0.5) == pytest.approx(1.0)
    assert reliance(0.9, 0.9) == pytest.approx(0.0)
    assert reliance(0.8, 0.71) == pytest.approx(0.3)
    assert reliance(0.5, 0.4) is None and reliance(None, 0.6) is None
    assert reliance(float("nan"), 0.6) is None


@pytest.mark.parametrize("exact", [True, False])
def test_policy_withholds_the_ablation(demo_root: Path, tmp_path: Path, exact: bool) -> None:
    """Exact metrics: every round; noisy counts: with the run's last round only (their noise
    grows with the views a row is counted in)."""
    run = tiny_run(demo_root, num_server_rounds=2)
    shared = {}
    for share in (True, False):
        policy = tmp_path / f"policy-{share}.toml"
        policy.write_text(
            f"share-ablation = {str(share).lower()}\nmin-eval-records = 1\n"
            f"exact-metrics = {str(exact).lower()}\n"
        )
        state = SiteState(hospital(demo_root, tmp_path / f"state-{share}", policy=policy))
        for server_round in (1, 2):
            evaluation = evaluate_round(state, run, request(state, run, server_round))
            content = evaluate_content(evaluation, "hospital-0")
            metrics = dict(content[R.METRICS])
            assert set(metrics) == set(R.EVAL_METRICS)
            views = {k.split("/")[0] for k in content[R.COUNTS]}
            shared[share, server_round] = metrics
            assert views == (
                {"lacking", "both", "image", "text"}
                if share and (exact or server_round == 2)
                else {"lacking", "both"}
            )
    assert all(math.isnan(shared[False, r][k]) for k in R.ABLATION_METRICS for r in (1, 2))
    if exact:  # noisy counts of a few rows can sum below one row: their accuracy is then nan
        assert all(
            math.isfinite(shared[True, 2][k])
            for k in (R.ACCURACY_BOTH, R.ACCURACY_IMAGE_ONLY, R.ACCURACY_TEXT_ONLY)
        )
    assert all(math.isnan(shared[True, 1][k]) for k in R.ABLATION_METRICS) is not exact
    if exact:  # the usual metrics are released either way, and the same
        assert shared[True, 1][R.ACCURACY] == shared[False, 1][R.ACCURACY]


def test_history_and_report_carry_the_modality_section() -> None:
    evaluate = {
        R.NUM_EXAMPLES: 30,
        R.AUROC: 0.82,
        R.AUROC_BOTH: 0.8,
        R.AUROC_IMAGE_ONLY: 0.71,
        R.AUROC_TEXT_ONLY: 0.66,
    }
    line = HistoryLine(
        round=1,
        sites={"hospital-0": SiteRound(evaluate=evaluate)},
        aggregate=dict(evaluate),
        modality_weights={"image": 0.4, "text": 0.6},
    )
    again = HistoryLine.from_json(line.to_json())
    assert again == line and line.to_json()["modality-weights"] == {"image": 0.4, "text": 0.6}
    assert "modality-weights" not in HistoryLine(round=2).to_json()
    assert "relies on the report for 30% of its AUROC" in modality_sentence(line.aggregate)
    text = to_markdown(
        report_blocks(RunRecords(name="r", history=[line], settings=None, model=None, summary=None))
    )
    assert "What the model uses" in text and "image 0.400, text 0.600" in text
    assert "30%" in text and "0.710" in text
    withheld = {k: None for k in R.ABLATION_METRICS}
    assert "withheld" in modality_sentence(withheld)


def test_weights_plot_holds_the_recorded_weights(tmp_path: Path) -> None:
    history = [
        HistoryLine(
            round=r,
            aggregate={R.AUROC_BOTH: 0.6 + r / 10},
            modality_weights={"image": w, "text": 1 - w},
        )
        for r, w in ((1, 0.5), (2, 0.42))
    ]
    names = {p.name for p in write_plots(tmp_path, history)}
    assert {"modality-weights.png", "modality-ablation.png"} <= names
    lines = {
        ln.get_label(): list(ln.get_ydata())
        for ln in plot_modality_weights(history).axes[0].get_lines()
    }
    assert lines == {"image": [0.5, 0.42], "text": [0.5, pytest.approx(0.58)]}
    ablation = {
        ln.get_label(): list(ln.get_ydata()) for ln in plot_ablation(history).axes[0].get_lines()
    }
    assert ablation["both"] == pytest.approx([0.7, 0.8])
