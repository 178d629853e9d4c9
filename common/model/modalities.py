"""Which trainable parameters a site's data can train, and freezing the others for a round.

A site whose training rows all lack reports cannot send a gradient into the text side of the
model (its trainable text layers, the fusion's text normalisation or projection); a site whose
rows all have reports never uses the `missing_text` placeholder. Such parameters would receive
only DP noise (and momentum from nothing), so the site freezes them for the round and sends
only the parameters it trained, naming the others (`protocol.UNTRAINED`); the server averages
each parameter over the sites that trained it. The same holds for the structured fields: a site
without them (an image-only site) freezes the tabular encoder and the fusion's tabular parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from torch import nn

from common.model.fusion_model import FusionModel
from common.model.trainable import trainable_names

# (has_image, has_text) of a row, and has_tabular when the run declares structured fields
Combo = tuple[bool, ...]


def _has_tabular(combo: Combo) -> bool:
    return len(combo) > 2 and combo[2]


# The rows whose gradient reaches a part of the model (names used by the fusions' REACHED_BY).
REACHES: dict[str, Callable[[Combo], bool]] = {
    "image": lambda c: c[0],
    "text": lambda c: c[1],
    "tabular": _has_tabular,
    "no-image": lambda c: not c[0],
    "no-text": lambda c: not c[1],
    "no-tabular": lambda c: not _has_tabular(c),
    "several": lambda c: c[0] + c[1] + _has_tabular(c) >= 2,
}
# The encoders only see their own modality: a missing one's features are masked in every fusion.
ENCODERS_REACHED_BY = {"image": "image", "text": "text", "tabular": "tabular"}


class HasModalities(Protocol):
    """A row with an image (None: none) and a report (empty: none), as a manifest `Row`."""

    @property
    def image(self) -> object: ...

    @property
    def text(self) -> object: ...


def modality_combos(rows: Iterable[HasModalities]) -> frozenset[Combo]:
    """The (has_image, has_text[, has_tabular]) combinations among rows (objects with `.image`,
    `.text` and, read with declared fields, `.tabular`)."""
    combos = set()
    for r in rows:
        cells = getattr(r, "tabular", ())
        tabular = (any(c is not None for c in cells),) if cells else ()
        combos.add((r.image is not None, bool(r.text), *tabular))
    return frozenset(combos)


def untrained_parameters(model: FusionModel, combos: Iterable[Combo]) -> list[str]:
    """Trainable parameters that no row of these modality combinations sends a gradient to."""
    combos = frozenset(combos)
    parts = dict(ENCODERS_REACHED_BY)
    parts.update({f"fusion.{name}": rows for name, rows in model.fusion.REACHED_BY.items()})
    unknown = set(parts.values()) - set(REACHES)
    assert not unknown, f"unknown REACHED_BY values {unknown}"
    untrained = []
    for name in trainable_names(model):
        prefix = next((p for p in parts if name.startswith(p + ".")), None)
        if prefix is None:
            continue  # reached by every row (projections, attention, head)
        reaches = REACHES[parts[prefix]]
        if not any(reaches(combo) for combo in combos):
            untrained.append(name)
    return untrained


@contextmanager
def frozen(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Freeze the named parameters inside the block (optimizer and DP hooks skip them)."""
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    assert all(p.requires_grad for p in chosen), "only trainable parameters can be frozen"
    for p in chosen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in chosen:
            p.requires_grad_(True)
