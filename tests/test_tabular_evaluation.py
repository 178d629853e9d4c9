"""The structured fields in what a site releases of an evaluation and in what the coordinator
reads: the fields-only and without-fields views are noisy counts charged like the others (their
noise grows with the views a row is counted in), a coordinator of a run without fields refuses
them, and the pooled metrics, the plot and the report carry them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client.app import evaluate_content
from client.evaluation import evaluate_round
from client.state import SiteState
from common import protocol as R
from common.runfolder import HistoryLine, RunSettings, SiteRound
from common.training.score_counts import ScoreCounts
from server.evaluation import MalformedCounts, SiteCounts, pooled_metrics, read_counts
from simulations.demo_data import DEMO_TABULAR_FIELDS
from tests.conftest import hospital, request, tiny_run
from tools.report import RunRecords, modality_sentence, report_blocks
from tools.report_format import to_markdown

FIELDS_VIEWS = {"tabular", "no-tabular"}
TWO_MODALITY_VIEWS = {"lacking", "both", "image", "text"}


def _evaluate(demo_root: Path, tmp_path: Path, *, fields: bool, exact: bool) -> dict:
    """Hospital 0's last-round evaluation reply (its ablation released), with or without fields."""
    policy = tmp_path / f"policy-{fields}-{exact}.toml"
    policy.write_text(
        f"share-ablation = true\nmin-eval-records = 1\nexact-metrics = {str(exact).lower()}\n"
    )
    run = tiny_run(
        demo_root, num_server_rounds=1, tabular_fields=DEMO_TABULAR_FIELDS if fields else ""
    )
    state = SiteState(hospital(demo_root, tmp_path / f"state-{fields}-{exact}", policy=policy))
    evaluation = evaluate_round(state, run, request(state, run, 1))
    content = evaluate_content(evaluation, "hospital-0")
    return {
        "metrics": dict(content[R.METRICS]),
        "counts": {k: v.numpy() for k, v in content[R.COUNTS].items()},
        "ablation": evaluation.ablation,
    }


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "noisy"])
def test_a_site_releases_what_its_fields_add(demo_root: Path, tmp_path: Path, exact: bool) -> None:
    with_fields = _evaluate(demo_root, tmp_path, fields=True, exact=exact)
    without = _evaluate(demo_root, tmp_path, fields=False, exact=exact)

    views = {k.split("/")[0] for k in with_fields["counts"]}
    assert views == TWO_MODALITY_VIEWS | FIELDS_VIEWS
    assert {k.split("/")[0] for k in without["counts"]} == TWO_MODALITY_VIEWS
    m, plain = with_fields["metrics"], without["metrics"]
    assert set(m) == set(R.EVAL_METRICS)
    fields_keys = (
        R.ACCURACY_FIELDS_ONLY,
        R.AUROC_FIELDS_ONLY,
        R.ACCURACY_WITHOUT_FIELDS,
        R.AUROC_WITHOUT_FIELDS,
    )
    assert all(math.isnan(plain[k]) for k in fields_keys)  # no fields: nan, never absent
    if exact:
        ablation = with_fields["ablation"]
        assert m[R.AUROC_FIELDS_ONLY] == round(ablation.tabular.auroc, 4)
        assert m[R.AUROC_WITHOUT_FIELDS] == round(ablation.no_tabular.auroc, 4)
        assert all(math.isfinite(m[k]) for k in fields_keys)
        assert m[R.COUNT_NOISE] == 0.0
    else:
        # a row is counted in one of lacking/both and in every ablation view: 5 views, not 3,
        # at the same release noise multiplier (same rows, same budget)
        assert m[R.COUNT_NOISE] / plain[R.COUNT_NOISE] == pytest.approx(math.sqrt(5 / 3))
        # the counts hold noise: the fields-only view is not the exact one
        assert not np.array_equal(
            with_fields["counts"]["tabular/scores"].round(), with_fields["counts"]["tabular/scores"]
        )


def _counts(views: set[str], rows: float = 10.0) -> dict[str, np.ndarray]:
    shapes = ScoreCounts.shapes(2)
    return {f"{v}/{name}": np.full(shape, rows) for v in views for name, shape in shapes.items()}


def test_the_coordinator_accepts_fields_views_only_in_a_run_that_declares_fields() -> None:
    full = _counts(TWO_MODALITY_VIEWS | FIELDS_VIEWS)
    assert set(read_counts(full, 2, fields=True)) == TWO_MODALITY_VIEWS | FIELDS_VIEWS
    with pytest.raises(MalformedCounts, match="tabular"):
        read_counts(full, 2, fields=False)  # views the run's model cannot have
    with pytest.raises(MalformedCounts):  # the fields views without the rest of the ablation
        read_counts(_counts({"lacking", "both", "tabular", "no-tabular"}), 2, fields=True)
    with pytest.raises(MalformedCounts):  # half of the fields' views
        read_counts(_counts(TWO_MODALITY_VIEWS | {"tabular"}), 2, fields=True)
    assert set(read_counts(_counts({"lacking", "both"}), 2, fields=True)) == {"lacking", "both"}


def test_pooled_metrics_carry_the_fields_views_from_the_sites_counts() -> None:
    """Two sites' noisy counts: the pooled fields-only AUROC is the AUROC of their summed counts,
    here a view whose positives all score above its negatives (1.0) against one at chance."""

    def view(separated: bool) -> ScoreCounts:
        scores = np.zeros(ScoreCounts.shapes(2)["scores"])  # (1, 2, bins): negatives, positives
        scores[0, 0, 1] = 5.0  # negatives score low
        scores[0, 1, 8 if separated else 1] = 5.0  # positives high, or as low as the negatives
        return ScoreCounts.from_arrays({"scores": scores})

    def site(separated_fields: bool) -> SiteCounts:
        counts = {v: view(True) for v in TWO_MODALITY_VIEWS}
        counts["tabular"], counts["no-tabular"] = view(separated_fields), view(True)
        return SiteCounts(records=10, metrics={R.LOSS: 0.5, R.COUNT_NOISE: 1.0}, counts=counts)

    pooled = pooled_metrics([site(True), site(True)])
    assert pooled[R.AUROC_FIELDS_ONLY] == pytest.approx(1.0)
    assert pooled[R.AUROC_WITHOUT_FIELDS] == pytest.approx(1.0)
    assert pooled_metrics([site(False), site(False)])[R.AUROC_FIELDS_ONLY] == pytest.approx(0.5)
    two_modality = SiteCounts(
        records=10,
        metrics={R.LOSS: 0.5, R.COUNT_NOISE: 1.0},
        counts={v: view(True) for v in TWO_MODALITY_VIEWS},
    )
    assert math.isnan(pooled_metrics([two_modality])[R.AUROC_FIELDS_ONLY])


def test_the_report_says_what_the_fields_add() -> None:
    evaluate = {
        R.NUM_EXAMPLES: 30,
        R.AUROC_BOTH: 0.8,
        R.AUROC_IMAGE_ONLY: 0.71,
        R.AUROC_TEXT_ONLY: 0.66,
        R.AUROC_FIELDS_ONLY: 0.6,
        R.AUROC_WITHOUT_FIELDS: 0.74,
    }
    line = HistoryLine(
        round=1, sites={"hospital-0": SiteRound(evaluate=evaluate)}, aggregate=dict(evaluate)
    )
    sentence = modality_sentence(line.aggregate)
    assert "relies on the report for 30%" in sentence
    assert "structured fields for 20%" in sentence  # (0.8 - 0.74) / (0.8 - 0.5)
    settings = RunSettings(run_key="k", settings={"model": {"tabular_fields": DEMO_TABULAR_FIELDS}})
    text = to_markdown(
        report_blocks(
            RunRecords(name="r", history=[line], settings=settings, model=None, summary=None)
        )
    )
    assert "AUROC fields only" in text and "relies on the fields" in text and "20%" in text
    plain = to_markdown(
        report_blocks(RunRecords(name="r", history=[line], settings=None, model=None, summary=None))
    )
    assert "relies on the fields" not in plain  # a run without fields keeps its table
