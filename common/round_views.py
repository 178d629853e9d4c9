"""What a coordinator watches after every round: a compact table, PNG plots, TensorBoard events.

Everything here reads history lines (the dicts `server.history` appends to `history.jsonl`), so
the views can never disagree with the record.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from common import records as R
from common.plots import write_plots
from common.tensorboard_events import write_round_events

log = logging.getLogger(__name__)

_HEADER = (f"{'site':<16} {'loss':>7} {'accuracy':>8} {'auroc':>7} {'epsilon':>8} {'cap':>6} "
           f"{'train n':>7} {'val n':>6} {'train s':>7}")


def _num(value: Any, width: int, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def _count(value: Any, width: int) -> str:
    return f"{value:>{width}d}" if isinstance(value, int) else f"{'-':>{width}}"


def _epsilon(m: dict[str, Any]) -> str:
    """A site's epsilon: `off` when it trained without DP (recorded as null), `-` if it did not train."""
    if R.EPSILON not in m:
        return f"{'-':>8}"
    return f"{'off':>8}" if m[R.EPSILON] is None else _num(m[R.EPSILON], 8)


def format_round_table(line: dict[str, Any]) -> str:
    """One round as a table: per site and aggregated loss, accuracy, AUROC, epsilon, sizes, time."""
    rows = [_HEADER]
    sites = line["sites"]
    for name, m in sites.items():
        rows.append(f"{name:<16} {_num(m.get(R.LOSS), 7)} {_num(m.get(R.ACCURACY), 8)} "
                    f"{_num(m.get(R.AUROC), 7)} {_epsilon(m)} {_num(m.get(R.EPSILON_CAP), 6, 2)} "
                    f"{_count(m.get(R.TRAIN_EXAMPLES), 7)} {_count(m.get(R.VAL_EXAMPLES), 6)} "
                    f"{_num(m.get(R.TRAIN_SECONDS), 7, 1)}")
    if "aggregate" in line:
        a = line["aggregate"]
        train_n = [m[R.TRAIN_EXAMPLES] for m in sites.values() if isinstance(m.get(R.TRAIN_EXAMPLES), int)]
        val_n = [m[R.VAL_EXAMPLES] for m in sites.values() if isinstance(m.get(R.VAL_EXAMPLES), int)]
        seconds = [m[R.TRAIN_SECONDS] for m in sites.values()
                   if isinstance(m.get(R.TRAIN_SECONDS), (int, float))]
        # epsilon is never aggregated; time is the slowest site's (sites train in parallel)
        rows.append(f"{'(aggregate)':<16} {_num(a.get(R.LOSS), 7)} {_num(a.get(R.ACCURACY), 8)} "
                    f"{_num(a.get(R.AUROC), 7)} {'':>8} {'':>6} "
                    f"{_count(sum(train_n) if train_n else None, 7)} "
                    f"{_count(sum(val_n) if val_n else None, 6)} "
                    f"{_num(max(seconds) if seconds else None, 7, 1)}")
    for kind, prefix in (("refusals", ""), ("failures", "failed: "), ("rejected", "update rejected: ")):
        for name, reason in line.get(kind, {}).items():
            why = (reason.partition("': ")[2] or reason).splitlines()[0]  # drop "site 'x': "
            rows.append(f"{name:<16} {prefix}{why}")
    if "stopped" in line:
        rows.append(f"stopped: {line['stopped'].splitlines()[0]}")
    return "\n".join(rows)


def write_round_views(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """After a round: redraw the PNG plots from the whole history, add the round to TensorBoard."""
    write_plots(out_dir, history)
    if history:
        write_round_events(out_dir, history[-1])
