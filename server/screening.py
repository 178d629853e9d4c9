"""The server's checks on the sites' updates, and the completion of partial updates.

Every train reply is screened before aggregation (`screen_updates`); a rejected update is
never aggregated, and the reason is recorded for its site. A reply is rejected when:
- it holds a parameter the global model does not have, or lacks one it did not declare as
  untrained (`protocol.UNTRAINED`), or declares one untrained that it also sent;
- a parameter has another shape or dtype than the global one, or holds NaN or Inf;
- its L2 distance from the global parameters exceeds `max-update-norm` (when set), or exceeds
  `update-norm-factor` times the median distance of the round's well-formed updates (when there
  are at least three of them, so that one outlier cannot move the median).
An accepted site's weight is capped at `max-weight-factor` times the round's lower median
weight (`cap_weights`): record counts are self-reported.

A site may leave out parameters it could not train (e.g. text-side ones at a site without
reports). `complete_partial_updates` fills each left-out parameter with the weighted mean of
the sites that did train it (or the current global value when none did). For FedAvg and the
FedAdam/FedYogi family this makes the aggregate exactly the average over the sites that trained
the parameter: a site's stale copy never pulls the average back. Robust strategies (median,
trimmed mean, Krum) see the trainers' mean in place of the missing value.

Plain numpy; no Flower imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class Update:
    """One site's train reply, as the server sees it."""

    site: str
    arrays: dict[str, np.ndarray]
    untrained: tuple[str, ...]
    num_examples: int


@dataclass(frozen=True, kw_only=True)
class UpdateBounds:
    """The norm bounds of `max-update-norm` and `update-norm-factor` (0 disables either)."""

    max_norm: float = 0.0
    median_factor: float = 0.0


@dataclass
class Screening:
    """Which updates may be aggregated, and why the others may not."""

    accepted: list[Update] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)  # L2 distance of each well-formed update


def structural_problem(update: Update, global_arrays: Arrays) -> str | None:
    """Why an update does not fit the global model (names, shapes, dtypes, values), or None."""
    sent, expected, untrained = set(update.arrays), set(global_arrays), set(update.untrained)
    if not sent:
        return "the update holds no parameters."
    if extra := sorted(sent - expected):
        return f"parameter(s) the model does not have: {_names(extra)}."
    if unknown := sorted(untrained - expected):
        return f"declared untrained parameter(s) the model does not have: {_names(unknown)}."
    if both := sorted(sent & untrained):
        return f"parameter(s) both sent and declared untrained: {_names(both)}."
    if missing := sorted(expected - sent - untrained):
        return f"missing parameter(s) not declared untrained: {_names(missing)}."
    for name in sorted(sent):
        got, want = update.arrays[name], global_arrays[name]
        if got.shape != want.shape:
            return f"parameter {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}."
        if got.dtype != want.dtype:
            return f"parameter {name} has dtype {got.dtype}, expected {want.dtype}."
        if not np.isfinite(got).all():
            return f"parameter {name} holds NaN or Inf values."
    return None


def update_norm(update: Update, global_arrays: Arrays) -> float:
    """L2 distance between the sent parameters and the global ones."""
    total = 0.0
    for k, a in update.arrays.items():
        d = a.astype(np.float64) - global_arrays[k]  # a fresh array: square it in place
        total += float(
            np.multiply(d, d, out=d).sum()
        )  # (no BLAS: its threads thrash on busy cores)
    return math.sqrt(total)


def screen_updates(
    updates: Sequence[Update], global_arrays: Arrays, bounds: UpdateBounds
) -> Screening:
    """Accept or reject each update (see the module docstring); order is kept."""
    result = Screening()
    formed: list[tuple[Update, float]] = []
    for u in updates:
        problem = structural_problem(u, global_arrays)
        if problem:
            result.rejected[u.site] = f"malformed update: {problem}"
        else:
            formed.append((u, update_norm(u, global_arrays)))
            result.norms[u.site] = formed[-1][1]
    median = float(np.median([n for _, n in formed])) if len(formed) >= 3 else 0.0
    for u, norm in formed:
        if bounds.max_norm > 0 and norm > bounds.max_norm:
            result.rejected[u.site] = (
                f"update norm {norm:.4g} exceeds max-update-norm {bounds.max_norm:.4g}."
            )
        elif bounds.median_factor > 0 and median > 0 and norm > bounds.median_factor * median:
            result.rejected[u.site] = (
                f"update norm {norm:.4g} exceeds update-norm-factor {bounds.median_factor:g} x the "
                f"round's median norm {median:.4g}."
            )
        else:
            result.accepted.append(u)
    return result


def cap_weights(updates: Sequence[Update], factor: float) -> tuple[list[Update], dict[str, str]]:
    """Each site's weight (`num-examples`) at most `factor` x the round's lower median weight.

    A site reports its own record count: a site that claims a hundredfold more records than its
    peers would otherwise outweigh them all. The lower median (for two sites, the smaller one)
    cannot be raised by one site; 0 turns the cap off. Returns the updates and, per capped site,
    what was changed.
    """
    if factor <= 0 or not updates:
        return list(updates), {}
    weights = sorted(u.num_examples for u in updates)
    cap = max(1, int(factor * weights[(len(weights) - 1) // 2]))
    capped = {
        u.site: f"weight {u.num_examples} capped to {cap} (max-weight-factor {factor:g} x "
        f"the round's median weight)"
        for u in updates
        if u.num_examples > cap
    }
    return [replace(u, num_examples=min(u.num_examples, cap)) for u in updates], capped


def complete_partial_updates(
    updates: Sequence[Update], global_arrays: Arrays
) -> list[dict[str, np.ndarray]]:
    """Each update's full parameter set: a left-out parameter gets the trainers' weighted mean.

    Returns one dict per update, keys in the global model's order.
    """
    filled: dict[str, np.ndarray] = {}
    for name, current in global_arrays.items():
        trainers = [u for u in updates if name in u.arrays]
        total = sum(u.num_examples for u in trainers)
        if not trainers or len(trainers) == len(updates):
            continue
        if total > 0:
            mean = sum(u.arrays[name].astype(np.float64) * u.num_examples for u in trainers) / total
        else:
            mean = np.mean([u.arrays[name].astype(np.float64) for u in trainers], axis=0)
        filled[name] = np.asarray(mean, dtype=current.dtype)
    complete = []
    for u in updates:
        complete.append(
            {
                name: u.arrays[name] if name in u.arrays else filled.get(name, global_arrays[name])
                for name in global_arrays
            }
        )
    return complete


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
