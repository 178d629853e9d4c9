"""The membership-inference audit, written as the attack: a model that memorised its training rows
is caught (AUC near 1), a model that never saw the rows is not (AUC near 0.5); the ROC numbers
and the DP bound match known values; `fedfusion privacy audit` prints its table and writes a page.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.data.dataset import ManifestDataset, PaddedText, text_length
from common.data.manifest import read_manifest
from common.model.checkpoint import save_model
from common.model.encoders import load_tokenizer
from common.model.feature_cache import CachedFusion, compute_features
from common.model.fusion_model import FusionModel, build_model
from common.privacy.membership import (
    AuditSettings,
    dp_bound,
    dp_tpr_bound,
    membership_audit,
    tpr_at_fpr,
)
from common.training.loop import train
from tests.conftest import tiny_run
from tools.privacy_cli import main

# references train like the target: small steps (a tiny model's ReLUs die at lr 0.1), many epochs
SETTINGS = AuditSettings(reference_models=4, epochs=150, learning_rate=0.01, batch_size=12)


def _sets(demo_root: Path) -> tuple[ManifestDataset, ManifestDataset, list[int]]:
    """24 members and 24 non-members of hospital 0, with labels drawn at random (to memorise)."""
    m = tiny_run(demo_root).model
    manifest, rows = read_manifest(demo_root / "hospital-0", m.class_names)
    rng = random.Random(0)
    rows = [replace(r, label=rng.choice(m.class_names)) for r in rows[:48]]
    tokenizer = load_tokenizer(m.text_encoder)

    def dataset(part: list) -> ManifestDataset:
        return ManifestDataset(
            manifest, part, m.class_names, tokenizer, m.image_size, m.max_text_length
        )

    return dataset(rows[:24]), dataset(rows[24:]), [r.line for r in rows[:24]]


def _memorised(members: ManifestDataset) -> FusionModel:
    """A tiny model trained on `members` until it has memorised them (no DP)."""
    model = build_model(tiny_run().model)
    net = CachedFusion(model)
    features = compute_features(net, members, torch.device("cpu"))
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    train(
        net,
        DataLoader(features, batch_size=24),
        optimizer,
        nn.CrossEntropyLoss(),
        epochs=200,
        device=torch.device("cpu"),
    )
    return model.eval()


def test_a_model_that_memorised_its_rows_is_caught(demo_root: Path) -> None:
    members, non_members, rows = _sets(demo_root)
    model = _memorised(members)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit = membership_audit(
        model, members, non_members, member_rows=rows, settings=SETTINGS, epsilon=8.0, delta=1e-5
    )
    assert audit.attack("loss").auc > 0.95 and audit.attack("lira").auc > 0.9
    assert audit.attack("loss").tpr_at[0.01] > 0.3  # identified without a single false positive
    assert {w.row for w in audit.worst_cases} <= set(rows) and len(audit.worst_cases) == 10
    # the audited model is given back as it was (the references reuse its modules)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_never_saw_the_rows_is_at_chance(demo_root: Path) -> None:
    members, non_members, rows = _sets(demo_root)
    model = build_model(tiny_run().model).eval()
    audit = membership_audit(model, members, non_members, member_rows=rows, settings=SETTINGS)
    for attack in audit.attacks:  # 24 vs 24: the AUC of exchangeable groups has sd 0.085
        assert abs(attack.auc - 0.5) < 0.2, attack.name
    assert audit.bound is None


def test_tpr_at_a_false_positive_rate() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.1, 0.85, 0.2, 0.15, 0.05])
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(0.25)  # above the best non-member
    assert tpr_at_fpr(labels, scores, 0.25) == pytest.approx(0.75)  # down to 0.3
    assert tpr_at_fpr(labels, scores, 1.0) == pytest.approx(1.0)


def test_dp_bound_on_any_attack() -> None:
    assert dp_tpr_bound(0.01, 1.0, 0.0) == pytest.approx(np.e * 0.01)
    assert dp_tpr_bound(0.01, 0.0, 0.0) == pytest.approx(0.01)
    # e^8 ~ 2981: the bound says little at eps 8
    assert dp_tpr_bound(0.01, 8.0, 1e-5) == pytest.approx(1 - 0.99 / np.exp(8), abs=1e-6)
    assert dp_bound(0.0, 0.0).auc == pytest.approx(0.5, abs=1e-4)
    assert dp_bound(float("inf"), 0.0).auc == pytest.approx(1.0)
    # eps 1: the tradeoff region's upper curve integrates to 0.5 + (e - 1) / (2 (e + 1)) ~ 0.731
    assert dp_bound(1.0, 0.0).auc == pytest.approx(0.5 + (np.e - 1) / (2 * (np.e + 1)), abs=1e-3)


def test_privacy_audit_command(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(tmp_path / "run", build_model(tiny_run().model))
    page = tmp_path / "audit.html"
    code = main(
        [
            "audit",
            "--model",
            str(tmp_path / "run"),
            "--manifest",
            str(demo_root / "hospital-2"),
            "--epsilon",
            "8",
            "--delta",
            "1e-5",
            "--reference-models",
            "2",
            "--device",
            "cpu",
            "--out",
            str(page),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "likelihood ratio (offline LiRA)" in out and "DP bound (eps 8.00" in out
    assert "Most exposed members" in out
    text = page.read_text()
    assert "Membership-inference audit" in text and "data:image/png;base64," in text
    assert (
        main(
            [
                "audit",
                "--model",
                str(tmp_path),
                "--manifest",
                str(demo_root / "hospital-2"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "holds no model.json" in capsys.readouterr().err


def test_padding_the_reports_further_changes_no_output(demo_root: Path) -> None:
    """Datasets tokenised apart pad to different lengths; the audit pads them alike, exactly."""
    members, _, _ = _sets(demo_root)
    model = build_model(tiny_run().model).eval()
    length = text_length(members)
    longer = PaddedText(members, length + 7)
    assert text_length(longer) == length + 7
    batch = next(iter(DataLoader(members, batch_size=8)))
    padded = next(iter(DataLoader(longer, batch_size=8)))
    with torch.no_grad():
        torch.testing.assert_close(
            model(**{k: v for k, v in padded.items() if k != "labels"}),
            model(**{k: v for k, v in batch.items() if k != "labels"}),
            rtol=1e-4,
            atol=1e-5,
        )
