"""The run's curves as PNG files: loss, AUROC and accuracy per site and aggregated, epsilon per
site, the modality ablation's AUROCs and (`weighted` fusion) the learned modality weights.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
switch), from history lines, after every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, TypedDict

from matplotlib.figure import Figure

from common import protocol as R
from common.files import atomic_write_bytes
from common.runfolder import HistoryLine

AGGREGATE = "aggregate"
# file name -> (history metric, axis label); each plot has one line per site and the aggregate
METRIC_PLOTS = {
    "loss.png": (R.LOSS, "validation loss (cross-entropy)"),
    "auroc.png": (R.AUROC, "validation AUROC (macro, one-vs-rest)"),
    "accuracy.png": (R.ACCURACY, "validation accuracy"),
}
EPSILON_PLOT = "epsilon.png"
WEIGHTS_PLOT = "modality-weights.png"  # `weighted` fusion only
ABLATION_PLOT = "modality-ablation.png"
# the aggregate's AUROC over the rows with both modalities, per kept modality
ABLATION_SERIES = {
    "both": R.AUROC_BOTH,
    "image only": R.AUROC_IMAGE_ONLY,
    "report only": R.AUROC_TEXT_ONLY,
    "fields only": R.AUROC_FIELDS_ONLY,  # these two: a run with structured fields
    "without fields": R.AUROC_WITHOUT_FIELDS,
}


@dataclass
class Series:
    """One curve: the rounds that have a finite value, and the values."""

    rounds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, server_round: int, value: Any) -> None:
        """Append a point if `value` is a finite number (history writes null for undefined)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.rounds.append(server_round)
            self.values.append(float(value))


def metric_series(history: list[HistoryLine], key: str) -> dict[str, Series]:
    """`key` per site (validation metrics) and for the aggregate (`AGGREGATE`) against the round."""
    series: dict[str, Series] = {}
    for line in history:
        for site, s in line.sites.items():
            series.setdefault(site, Series()).add(line.round, s.metric(key))
        if line.aggregate is not None:
            series.setdefault(AGGREGATE, Series()).add(line.round, line.aggregate.get(key))
    return {name: s for name, s in series.items() if s.rounds}


def epsilon_caps(history: list[HistoryLine]) -> dict[str, float]:
    """Each site's last reported epsilon cap (sites without DP report none)."""
    caps: dict[str, float] = {}
    for line in history:
        for site, s in line.sites.items():
            cap = (s.train or {}).get(R.EPSILON_CAP)
            if isinstance(cap, (int, float)) and math.isfinite(cap):
                caps[site] = float(cap)
    return caps


class _LineStyle(TypedDict, total=False):
    """Keyword arguments of `Axes.plot` that set a line's style."""

    linewidth: float
    linestyle: str
    color: str


def plot_metric(history: list[HistoryLine], key: str, label: str) -> Figure:
    """A figure with one line per site and a thicker dashed line for the aggregate."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, s in metric_series(history, key).items():
        style: _LineStyle = (
            _LineStyle(linewidth=2.5, linestyle="--", color="black") if name == AGGREGATE else {}
        )
        ax.plot(s.rounds, s.values, marker="o", label=name, **style)
    _decorate(ax, label, history)
    return fig


def plot_epsilon(history: list[HistoryLine]) -> Figure:
    """Each site's cumulative epsilon against the round, with its cap as a dotted line."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    caps = epsilon_caps(history)
    for name, s in metric_series(history, R.EPSILON).items():
        if name == AGGREGATE:
            continue
        (line,) = ax.plot(s.rounds, s.values, marker="o", label=name)
        if name in caps:
            ax.axhline(caps[name], color=line.get_color(), linestyle=":", label=f"{name} cap")
    ax.set_ylim(bottom=0)
    _decorate(ax, "cumulative epsilon (per site)", history)
    return fig


def weight_series(history: list[HistoryLine]) -> dict[str, Series]:
    """The weighted fusion's learned weight per modality against the round (empty otherwise)."""
    series: dict[str, Series] = {}
    for line in history:
        for modality, weight in (line.modality_weights or {}).items():
            series.setdefault(modality, Series()).add(line.round, weight)
    return series


def plot_modality_weights(history: list[HistoryLine]) -> Figure:
    """The weighted fusion's weights (image, text) of the global model after each round."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for modality, s in weight_series(history).items():
        ax.plot(s.rounds, s.values, marker="o", label=modality)
    ax.set_ylim(0, 1)
    _decorate(ax, "learned fusion weight", history)
    return fig


def plot_ablation(history: list[HistoryLine]) -> Figure:
    """Aggregated validation AUROC with both modalities, the image only and the report only (and
    the fields only and without the fields, in a run with structured fields)."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, key in ABLATION_SERIES.items():
        s = metric_series(history, key).get(AGGREGATE)
        if s is not None:
            ax.plot(s.rounds, s.values, marker="o", label=label)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    _decorate(ax, "AUROC on rows with both modalities", history)
    return fig


def _decorate(ax: Any, label: str, history: list[HistoryLine]) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    rounds = [line.round for line in history]
    if rounds:
        ax.set_xticks(range(min(rounds), max(rounds) + 1))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")


def write_plots(out_dir: Path, history: list[HistoryLine]) -> list[Path]:
    """Write loss, AUROC, accuracy and epsilon PNGs into `out_dir`; return their paths."""
    figures = {
        name: plot_metric(history, key, label) for name, (key, label) in METRIC_PLOTS.items()
    }
    figures[EPSILON_PLOT] = plot_epsilon(history)
    figures[ABLATION_PLOT] = plot_ablation(history)
    if weight_series(history):
        figures[WEIGHTS_PLOT] = plot_modality_weights(history)
    paths = []
    for name, fig in figures.items():
        path = out_dir / name
        atomic_write_bytes(path, figure_png(fig))
        paths.append(path)
    return paths


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
