"""Progress of a site's local training and evaluation: a tqdm bar on a TTY, log lines otherwise.

On a terminal (stderr is a TTY) a bar shows batches, rate and the running loss. Elsewhere (CI,
Ray workers, log files) bars would fill logs with carriage returns, so the loops stay quiet and
log one line per epoch or evaluation instead (`log_line`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether progress bars make sense: stderr is attached to a terminal."""
    return sys.stderr.isatty()


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """`items` wrapped in a tqdm bar (unit: batch) when on a terminal, else `items` itself."""
    if not on_terminal():
        return items
    bar: Iterable[T] = tqdm(
        items,
        desc=desc,
        total=total,
        unit="batch",
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    return bar


def show_loss(bar: Iterable[object], loss: float) -> None:
    """Put the running loss on the bar, if it is one."""
    if isinstance(bar, tqdm):
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def log_line(logger: logging.Logger, message: str, *args: object) -> None:
    """Log a progress line at INFO unless a bar already shows it (then at DEBUG)."""
    logger.log(logging.DEBUG if on_terminal() else logging.INFO, message, *args, stacklevel=2)


def batches(loader: Iterable[T]) -> int | None:
    """The number of batches of `loader` if it has a length (Poisson loaders: the expected one)."""
    try:
        return len(loader)  # type: ignore[arg-type]  # may be Sized: a TypeError says not
    except TypeError:
        return None
