"""Structured fields through a site's round: trained under DP-SGD and charged in the ledger;
a tabular-only site and an image-only site each train only what their data reaches."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from client.rounds import train_round
from client.state import SiteState
from common.model.trainable import trainable_state
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from tests.conftest import hospital, request, tiny_run

SCHEMA = "age:numeric:0:120;sex:categorical:F|M"


def with_fields(source: Path, target: Path, *, keep: tuple[str, ...] = ("image", "text")) -> Path:
    """A copy of a demo manifest with age and sex (about a fifth missing) and only the `keep`
    modalities; images point back at the source folder."""
    with (source / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(0)
    for row in rows:
        row["image"] = str(source / row["image"]) if "image" in keep else ""
        row["text"] = row["text"] if "text" in keep else ""
        row["age"] = "" if rng.random() < 0.2 else str(rng.randint(20, 90))
        row["sex"] = "" if rng.random() < 0.2 else rng.choice("FM")
        if "tabular" not in keep and keep:
            row["age"] = row["sex"] = ""
        if not keep:  # fields only: at least one present per row
            row["age"] = row["age"] or "50"
    target.mkdir(parents=True)
    with (target / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.mark.parametrize(
    ("keep", "untrained_prefixes", "trained_prefixes"),
    [
        (("image", "text", "tabular"), (), ("tabular.", "fusion.tabular_norm", "head.")),
        ((), ("fusion.image_norm", "fusion.text_norm"), ("tabular.", "fusion.missing_image")),
        (("image",), ("tabular.", "fusion.tabular_norm"), ("fusion.missing_tabular",)),
    ],
    ids=["three-modalities", "tabular-only", "image-only"],
)
def test_a_site_trains_its_fields_under_dp_and_is_charged(
    demo_root: Path,
    tmp_path: Path,
    keep: tuple[str, ...],
    untrained_prefixes: tuple[str, ...],
    trained_prefixes: tuple[str, ...],
) -> None:
    data = with_fields(demo_root / "hospital-0", tmp_path / "site", keep=keep)
    run = tiny_run(demo_root, tabular_fields=SCHEMA, local_steps=2, num_server_rounds=2)
    state = SiteState(hospital(tmp_path, tmp_path / "state", 0, manifest=data))
    start = trainable_state(state.bundle(run.model).model)
    outcome = train_round(state, run, request(state, run, 1, run_key="tab"))

    assert outcome.account is not None and outcome.account.epsilon > 0  # DP-SGD, accounted
    entry = load_ledger(state.site.state_dir).run("tab")
    assert entry is not None and entry.rounds == (1,) and entry.unprotected_rounds == ()
    assert [r.round for r in read_receipts(state.site.state_dir)] == [1]
    for prefix in untrained_prefixes:
        assert any(n.startswith(prefix) for n in outcome.untrained), prefix
        assert not any(n.startswith(prefix) for n in outcome.state), prefix
    for prefix in trained_prefixes:
        moved = [n for n in outcome.state if n.startswith(prefix)]
        assert moved and all(not torch.equal(outcome.state[n], start[n]) for n in moved), prefix
