"""A site's privacy ledger and receipts on disk, in its state directory.

- `ledger.json` is the authoritative record of what each run has spent: per run id, the dataset
  version it trained on, the calibrated noise and the accountant history. It is rewritten
  atomically (write, fsync, rename, fsync the folder) after every round and before the reply
  leaves the site, so a crash can over-count a round that was never sent, never under-count one.
- `receipts.jsonl` has one line per round a site trained: what was spent and a SHA-256 of the
  exact update that left the site. `fedfusion privacy report` re-derives epsilon from it.

A dataset version is the SHA-256 of the manifest file. Accountant histories are lists of
(noise multiplier, sample rate, steps), independent of the accountant, so spends of several
runs on one dataset compose into one history.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.files import append_line_atomic, atomic_write_bytes
from common.privacy import HistoryEntry, Ledger

LEDGER_FILE = "ledger.json"
RECEIPTS_FILE = "receipts.jsonl"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1


class LedgerError(RuntimeError):
    """The state directory cannot be read or written safely."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a manifest: the dataset version)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of an update as sent: names, dtypes, shapes and bytes, in order.

    Accepts torch tensors or numpy arrays, so a site and the server hash the same bytes.
    """
    digest = hashlib.sha256()
    for name, value in arrays.items():
        arr = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else value)
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """What one run spent at this site."""

    dataset: str  # manifest SHA-256
    ledger: Ledger | None  # None: the run trained without DP (nothing accounted)
    rounds: tuple[int, ...] = ()  # server rounds this site trained


@dataclass(frozen=True)
class LedgerBook:
    """Every run's spend at this site, keyed by run id."""

    runs: dict[str, RunRecord] = field(default_factory=dict)

    def run(self, run_id: str) -> RunRecord | None:
        """This run's record, if the site has trained in it."""
        return self.runs.get(run_id)

    def prior_history(self, dataset: str, run_id: str) -> list[HistoryEntry]:
        """Accountant history of every other run on the same dataset version."""
        return [entry for rid, rec in sorted(self.runs.items())
                if rec.dataset == dataset and rid != run_id and rec.ledger
                for entry in rec.ledger.history]

    def with_run(self, run_id: str, record: RunRecord) -> LedgerBook:
        """A new book with `run_id`'s record replaced."""
        return replace(self, runs={**self.runs, run_id: record})


def _record_to_json(rec: RunRecord) -> dict[str, Any]:
    ledger = json.loads(rec.ledger.to_json()) if rec.ledger else None
    return {"dataset": rec.dataset, "rounds": list(rec.rounds), "ledger": ledger}


@contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the state folder's lock: two runs at one site must not interleave read and write."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = (state_dir / LOCK_FILE).open("a")
    except OSError as err:
        raise LedgerError(f"Cannot use the state folder {state_dir} ({err}); nothing is sent "
                          "until the privacy ledger can be written there.") from err
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def load_book(state_dir: Path) -> LedgerBook:
    """Read the ledger (an absent file is an empty ledger: a site's first run)."""
    path = state_dir / LEDGER_FILE
    if not path.exists():
        return LedgerBook()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        runs = {rid: RunRecord(rec["dataset"],
                               Ledger.from_json(json.dumps(rec["ledger"])) if rec["ledger"] else None,
                               tuple(rec["rounds"])) for rid, rec in data["runs"].items()}
    except (ValueError, KeyError, TypeError) as err:
        raise LedgerError(
            f"The privacy ledger {path} is unreadable ({err}). It records what this site has "
            "spent: restore it from a backup; do not delete it.") from err
    return LedgerBook(runs)


def save_book(state_dir: Path, book: LedgerBook) -> None:
    """Write the ledger atomically and make the rename durable."""
    data = {"version": FORMAT_VERSION,
            "runs": {rid: _record_to_json(rec) for rid, rec in sorted(book.runs.items())}}
    payload = (json.dumps(data, indent=1) + "\n").encode()
    _guarded(lambda: atomic_write_bytes(state_dir / LEDGER_FILE, payload, durable=True), state_dir)


@dataclass(frozen=True)
class Receipt:
    """One round's privacy receipt: what was spent and what left the site."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps in this round
    accountant: str
    epsilon: float | None  # cumulative over this run after this round (None: trained without DP)
    delta: float | None
    scope_epsilon: float | None  # cumulative over the policy's budget scope (run or dataset)
    budget_scope: str
    update_sha256: str
    dataset_sha256: str
    time: str

    @staticmethod
    def now() -> str:
        """UTC time stamp for a receipt."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_receipt(state_dir: Path, receipt: Receipt) -> None:
    """Append one receipt line (atomically: the file is never left half-written)."""
    _guarded(lambda: append_line_atomic(state_dir / RECEIPTS_FILE, json.dumps(asdict(receipt)),
                                        durable=True), state_dir)


def read_receipts(state_dir: Path) -> list[Receipt]:
    """All receipts of a state directory, in the order they were written."""
    path = state_dir / RECEIPTS_FILE
    if not path.exists():
        return []
    return [Receipt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _guarded(write: Callable[[], None], state_dir: Path) -> None:
    try:
        write()
    except OSError as err:
        raise LedgerError(f"Cannot write the privacy ledger in {state_dir} ({err}); "
                          "nothing is sent until it can be written.") from err
