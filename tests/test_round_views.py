"""The per-round views: the table, the plots' data, TensorBoard events, progress bars."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from common import protocol as R
from common.runfolder import HistoryLine, SiteRound
from common.training import progress
from common.views.plots import AGGREGATE, metric_series, plot_epsilon, plot_metric, write_plots
from common.views.round_views import format_round_table
from common.views.tensorboard_events import round_scalars, write_round_events


def _site(
    loss: float | None, auroc: float | None, eps: float | None, cap: float | None = 8.0, n: int = 40
) -> SiteRound:
    return SiteRound(
        train={R.NUM_EXAMPLES: n, R.EPSILON: eps, R.EPSILON_CAP: cap, R.TRAIN_SECONDS: 2.5},
        evaluate={R.NUM_EXAMPLES: 10, R.LOSS: loss, R.ACCURACY: 0.5, R.AUROC: auroc},
    )


HISTORY = [
    HistoryLine(
        round=1,
        sites={"a": _site(1.0, 0.6, 3.0), "b": _site(2.0, None, 4.0, cap=5.0)},
        aggregate={R.LOSS: 1.5, R.AUROC: 0.6, R.ACCURACY: 0.5},
    ),
    HistoryLine(
        round=2,
        sites={"a": _site(0.8, 0.7, 5.0)},
        aggregate={R.LOSS: 0.8, R.AUROC: 0.7, R.ACCURACY: 0.5},
        refusals={"b": "refused: this run's epsilon would reach 5.2"},
    ),
]


def test_history_lines_survive_a_json_round_trip() -> None:
    for line in HISTORY:
        assert HistoryLine.from_json(line.to_json()) == line


def test_round_table_has_sites_aggregate_and_refusals() -> None:
    table = format_round_table(HISTORY[1])
    lines = table.splitlines()
    assert lines[0].split() == [
        "site",
        "loss",
        "accuracy",
        "auroc",
        "epsilon",
        "cap",
        "train",
        "n",
        "val",
        "n",
        "train",
        "s",
    ]
    assert lines[1].split() == ["a", "0.800", "0.500", "0.700", "5.000", "8.00", "40", "10", "2.5"]
    assert lines[2].split()[:4] == ["(aggregate)", "0.800", "0.500", "0.700"]
    assert lines[3] == f"{'b':<16} refused: this run's epsilon would reach 5.2"


def test_round_table_pools_evaluation_only_sites_apart() -> None:
    external = SiteRound(
        evaluate={R.NUM_EXAMPLES: 50, R.LOSS: 0.9, R.ACCURACY: 0.6, R.AUROC: 0.75, R.EXTERNAL: 1.0}
    )
    aggregate = {R.LOSS: 0.8, R.AUROC: 0.7, R.ACCURACY: 0.5}
    aggregate |= {f"external-{k}": v for k, v in external.evaluate.items() if k != R.EXTERNAL}
    line = HistoryLine(
        round=1, sites={"a": _site(0.8, 0.7, 5.0), "x": external}, aggregate=aggregate
    )
    lines = format_round_table(line).splitlines()
    assert lines[2].split() == ["x", "0.900", "0.600", "0.750", "-", "-", "-", "50", "-"]
    assert lines[3].split()[:4] == ["(aggregate)", "0.800", "0.500", "0.700"]
    assert lines[4].split() == ["(external)", "0.900", "0.600", "0.750", "50"]


def test_round_table_says_off_without_dp() -> None:
    line = HistoryLine(round=1, sites={"a": _site(1.0, 0.5, None, cap=None)}, aggregate={})
    assert format_round_table(line).splitlines()[1].split()[4:6] == ["off", "-"]


def test_plot_lines_carry_the_history_values() -> None:
    fig = plot_metric(HISTORY, R.LOSS, "loss")
    lines = {
        ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
        for ln in fig.axes[0].get_lines()
    }
    assert lines == {"a": ([1, 2], [1.0, 0.8]), "b": ([1], [2.0]), AGGREGATE: ([1, 2], [1.5, 0.8])}
    # a missing value (AUROC of b: null in history) is skipped, not drawn as 0
    assert set(metric_series(HISTORY, R.AUROC)) == {"a", AGGREGATE}


def test_epsilon_plot_draws_each_site_and_its_cap() -> None:
    fig = plot_epsilon(HISTORY)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    assert lines["a"] == [3.0, 5.0] and lines["b"] == [4.0]
    assert lines["a cap"] == [8.0, 8.0] and lines["b cap"] == [5.0, 5.0]
    assert AGGREGATE not in lines  # privacy is never aggregated


def test_write_plots_writes_the_pngs(tmp_path: Path) -> None:
    paths = write_plots(tmp_path, HISTORY)
    assert sorted(p.name for p in paths) == [
        "accuracy.png",
        "auroc.png",
        "epsilon.png",
        "loss.png",
        "modality-ablation.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_tensorboard_scalars_match_the_plot_series() -> None:
    scalars = round_scalars(HISTORY[0])
    assert scalars["loss/a"] == 1.0 and scalars["loss/aggregate"] == 1.5
    assert scalars["epsilon/b"] == 4.0 and scalars["epsilon-cap/b"] == 5.0
    assert "auroc/b" not in scalars and "epsilon/aggregate" not in scalars


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for line in HISTORY:
        write_round_events(tmp_path, line)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/a")] == [(1, 1.0), (2, pytest.approx(0.8))]
    assert [(e.step, e.value) for e in acc.Scalars("epsilon/a")] == [(1, 3.0), (2, 5.0)]


def test_tensorboard_is_skipped_cleanly_when_absent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("common.views.tensorboard_events.tensorboard_available", lambda: False)
    assert write_round_events(tmp_path, HISTORY[0]) is None
    assert not (tmp_path / "tensorboard").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch, caplog) -> None:
    log = logging.getLogger("test.progress")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    items = [1, 2, 3]
    assert progress.progress(items, desc="x") is items  # not a terminal: no bar at all
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress.log_line(log, "epoch %d done", 1)
    assert [r.getMessage() for r in caplog.records] == ["epoch 1 done"]

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.clear()
    assert list(progress.progress(items, desc="train epoch 1/2")) == items
    assert "train epoch 1/2" in terminal.getvalue() and "/3" in terminal.getvalue()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress.log_line(log, "epoch %d done", 1)
    assert not caplog.records  # the bar shows it; the line goes to DEBUG
