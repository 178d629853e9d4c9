"""TensorBoard event files with the same series as the PNG plots, when `tensorboard` is installed.

Optional (`pip install fedfusion[tensorboard]`): without it nothing is written and a single
INFO line says how to get it. Events go to `<run folder>/tensorboard/`; view them with
`tensorboard --logdir outputs/<run-name>/tensorboard`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from pathlib import Path

from common import protocol as R
from common.runfolder import HistoryLine

log = logging.getLogger(__name__)

EVENTS_FOLDER = "tensorboard"
METRICS = (R.LOSS, R.AUROC, R.ACCURACY)  # per site and aggregate
PER_SITE = (R.EPSILON, R.EPSILON_CAP)  # per site only: privacy is never aggregated


def tensorboard_available() -> bool:
    """Whether the optional `tensorboard` package (needed by torch's SummaryWriter) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def round_scalars(line: HistoryLine) -> dict[str, float]:
    """A history line as TensorBoard tags (`<metric>/<site>`, `<metric>/aggregate`) -> value."""
    scalars: dict[str, float | int | None] = {}
    for site, s in line.sites.items():
        for key in (*METRICS, *PER_SITE):
            scalars[f"{key}/{site}"] = s.metric(key)
    for key in METRICS:
        scalars[f"{key}/aggregate"] = (line.aggregate or {}).get(key)
    return {
        tag: float(v)
        for tag, v in scalars.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


@functools.cache
def _note_missing() -> None:
    """Say once per process why there are no event files."""
    log.info("tensorboard is not installed: no event files (pip install 'fedfusion[tensorboard]').")


def write_round_events(out_dir: Path, line: HistoryLine) -> Path | None:
    """Append one round's scalars to the run's event files; None when tensorboard is absent."""
    if not tensorboard_available():
        _note_missing()
        return None
    from torch.utils.tensorboard import SummaryWriter

    folder = out_dir / EVENTS_FOLDER
    with SummaryWriter(log_dir=str(folder)) as writer:
        for tag, value in round_scalars(line).items():
            writer.add_scalar(tag, value, global_step=line.round)
    return folder
