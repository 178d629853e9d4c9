"""What a coordinator watches after every round: a compact table, PNG plots, TensorBoard events.

Everything here reads history lines (`common.runfolder.HistoryLine`, as the coordinator appends
them to `history.jsonl`), so the views can never disagree with the record.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from common import protocol as R
from common.runfolder import HistoryLine, SiteRound
from common.views.plots import write_plots
from common.views.tensorboard_events import write_round_events

log = logging.getLogger(__name__)

_HEADER = (
    f"{'site':<16} {'loss':>7} {'accuracy':>8} {'auroc':>7} {'epsilon':>8} {'cap':>6} "
    f"{'train n':>7} {'val n':>6} {'train s':>7}"
)


def _num(value: Any, width: int, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def _count(value: Any, width: int) -> str:
    return f"{value:>{width}d}" if isinstance(value, int) else f"{'-':>{width}}"


def _whole(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _epsilon(s: SiteRound) -> str:
    """A site's epsilon: `off` if trained without DP (recorded as null), `-` if it did not train."""
    if s.train is None:
        return f"{'-':>8}"
    return f"{'off':>8}" if s.train.get(R.EPSILON) is None else _num(s.train[R.EPSILON], 8)


def format_round_table(line: HistoryLine) -> str:
    """One round as a table: per site and aggregated loss, accuracy, AUROC, epsilon, sizes, time.

    The aggregate pools the training sites' validation rows; evaluation-only sites' records are
    pooled apart, as an external validation (the `(external)` row)."""
    rows = [_HEADER]
    train = {n: s.train or {} for n, s in line.sites.items()}
    val = {n: s.evaluate or {} for n, s in line.sites.items()}
    for name, s in line.sites.items():
        rows.append(
            f"{name:<16} {_num(val[name].get(R.LOSS), 7)} {_num(val[name].get(R.ACCURACY), 8)} "
            f"{_num(val[name].get(R.AUROC), 7)} {_epsilon(s)} "
            f"{_num(train[name].get(R.EPSILON_CAP), 6, 2)} "
            f"{_count(train[name].get(R.NUM_EXAMPLES), 7)} "
            f"{_count(val[name].get(R.NUM_EXAMPLES), 6)} "
            f"{_num(train[name].get(R.TRAIN_SECONDS), 7, 1)}"
        )
    if line.aggregate is not None:
        a = line.aggregate
        train_n = [
            m[R.NUM_EXAMPLES] for m in train.values() if isinstance(m.get(R.NUM_EXAMPLES), int)
        ]
        val_n = [m[R.NUM_EXAMPLES] for m in val.values() if isinstance(m.get(R.NUM_EXAMPLES), int)]
        seconds = [
            t for m in train.values() if isinstance(t := m.get(R.TRAIN_SECONDS), (int, float))
        ]
        # epsilon is never aggregated; time is the slowest site's (sites train in parallel)
        rows.append(
            f"{'(aggregate)':<16} {_num(a.get(R.LOSS), 7)} {_num(a.get(R.ACCURACY), 8)} "
            f"{_num(a.get(R.AUROC), 7)} {'':>8} {'':>6} "
            f"{_count(sum(train_n) if train_n else None, 7)} "
            f"{_count(sum(val_n) if val_n else None, 6)} "
            f"{_num(max(seconds) if seconds else None, 7, 1)}"
        )
        if f"{R.EXTERNAL}-{R.AUROC}" in a:  # evaluation-only sites, pooled apart
            rows.append(
                f"{'(external)':<16} {_num(a.get(f'{R.EXTERNAL}-{R.LOSS}'), 7)} "
                f"{_num(a.get(f'{R.EXTERNAL}-{R.ACCURACY}'), 8)} "
                f"{_num(a.get(f'{R.EXTERNAL}-{R.AUROC}'), 7)} {'':>8} {'':>6} {'':>7} "
                f"{_count(_whole(a.get(f'{R.EXTERNAL}-{R.NUM_EXAMPLES}')), 6)}"
            )
    for reasons, prefix in (
        (line.refusals, ""),
        (line.failures, "failed: "),
        (line.rejected, "update rejected: "),
    ):
        for name, reason in reasons.items():
            rows.append(f"{name:<16} {prefix}{reason.splitlines()[0]}")
    if line.stopped is not None:
        rows.append(f"stopped: {line.stopped.splitlines()[0]}")
    return "\n".join(rows)


def write_round_views(out_dir: Path, history: list[HistoryLine]) -> None:
    """After a round: redraw the PNG plots from the whole history, add the round to TensorBoard."""
    write_plots(out_dir, history)
    if history:
        write_round_events(out_dir, history[-1])
