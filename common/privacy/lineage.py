"""Which dataset versions share records, so that a dataset's budget follows its rows.

With `budget-scope = "dataset"` a run composes with every earlier run on a version that shares
at least one record with its own (`common.data.version.record_keys`: an image's bytes, a report
with its patient). Adding, removing or editing rows therefore never lowers the spend of a row
that stays: its earlier runs are always composed. A site keeps the keys of every version it has
spent budget on in its state folder (`datasets/<version>.keys`: digests, no content; owner-only).
A version whose keys are not kept (spent before they were) counts as sharing records with
every other: the conservative answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common.files import atomic_write_bytes
from common.privacy.ledger import guarded_write

DATASETS_FOLDER = "datasets"


def _keys_file(state_dir: Path, version: str) -> Path:
    return state_dir / DATASETS_FOLDER / f"{version}.keys"


def remember(state_dir: Path, version: str, keys: frozenset[str]) -> None:
    """Keep the record keys of `version` (once; before any spend on it is recorded)."""
    path = _keys_file(state_dir, version)
    if path.exists():
        return
    payload = "".join(f"{k}\n" for k in sorted(keys)).encode()

    def write() -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, payload, durable=True)

    guarded_write(write, state_dir)


def known_keys(state_dir: Path, version: str) -> frozenset[str] | None:
    """The record keys kept for `version`, or None when they are not kept."""
    path = _keys_file(state_dir, version)
    if not path.exists():
        return None
    return frozenset(line for line in path.read_text().splitlines() if line)


def related(
    state_dir: Path, version: str, keys: frozenset[str] | None, others: Iterable[str]
) -> set[str]:
    """Of `others`, the versions that share a record with `version` (whose keys are `keys`)."""
    out = set()
    for other in others:
        if other == version:
            out.add(other)
            continue
        theirs = known_keys(state_dir, other)
        if keys is None or theirs is None or keys & theirs:
            out.add(other)
    return out
