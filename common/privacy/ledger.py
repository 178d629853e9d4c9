"""A site's privacy ledger on disk, in its state directory: what every run has spent there.

`ledger.json` is the authoritative record: per run id, the dataset version it trained on, the
rounds it trained, and its account (calibrated noise, accountant history, epsilon). It is
rewritten atomically (write, fsync, rename, fsync the folder) after every round and before the
reply leaves the site, so a crash can over-count a round that was never sent, never under-count
one. The receipts of the rounds are `common.privacy.receipts`.

Accountant histories are lists of (noise multiplier, sample rate, steps), independent of the
accountant, so the spends of several runs on one dataset compose into one history.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.errors import Failure
from common.files import atomic_write_bytes
from common.privacy.accounting import Account, HistoryEntry

LEDGER_FILE = "ledger.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 3


class LedgerError(Failure):
    """The state directory cannot be read or written safely."""

    default_reason = "state-folder"


@dataclass(frozen=True, kw_only=True)
class RunEntry:
    """What one run spent at this site."""

    dataset: str  # the dataset version the run trained on
    account: Account | None  # None: no round of the run trained with DP (nothing accounted)
    rounds: tuple[int, ...] = ()  # server rounds this site trained
    unprotected_rounds: tuple[int, ...] = ()  # of those, the rounds trained without DP
    evaluated: tuple[int, ...] = ()  # server rounds this site released evaluation metrics for
    flower_runs: tuple[int, ...] = ()  # the Flower runs that used this run key (one, or resumes)
    # the run's secure-aggregation steps: (index in the account's history, the noise multiplier
    # of the site's own share alone), for the fallback guarantee (`Books.fallback_epsilon`)
    secure_steps: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Ledger:
    """Every run's spend at this site, keyed by run id."""

    runs: dict[str, RunEntry] = field(default_factory=dict)

    def run(self, run_id: str) -> RunEntry | None:
        """This run's entry, if the site has trained in it."""
        return self.runs.get(run_id)

    def prior_history(self, datasets: Collection[str], run_id: str) -> list[HistoryEntry]:
        """Accountant history of every other run on one of `datasets` (the versions that share
        records with the run's: `common.privacy.lineage`)."""
        return [
            entry
            for rid, rec in sorted(self.runs.items())
            if rec.dataset in datasets and rid != run_id and rec.account
            for entry in rec.account.history
        ]

    def datasets(self) -> set[str]:
        """Every dataset version a run of this ledger used."""
        return {rec.dataset for rec in self.runs.values()}

    def run_key_of(self, flower_run: int) -> str | None:
        """The run key a Flower run trains under at this site, if it trained or evaluated yet."""
        return next(
            (key for key, entry in self.runs.items() if flower_run in entry.flower_runs), None
        )

    def with_run(self, run_id: str, entry: RunEntry) -> Ledger:
        """A new ledger with `run_id`'s entry replaced."""
        return replace(self, runs={**self.runs, run_id: entry})


def _entry_to_json(rec: RunEntry) -> dict[str, Any]:
    account = json.loads(rec.account.to_json()) if rec.account else None
    return {
        "dataset": rec.dataset,
        "rounds": list(rec.rounds),
        "account": account,
        "unprotected_rounds": list(rec.unprotected_rounds),
        "evaluated": list(rec.evaluated),
        "flower_runs": list(rec.flower_runs),
        "secure_steps": [list(step) for step in rec.secure_steps],
    }


def _entry_from_json(rec: dict[str, Any]) -> RunEntry:
    return RunEntry(
        dataset=rec["dataset"],
        rounds=tuple(rec["rounds"]),
        account=Account.from_json(json.dumps(rec["account"])) if rec["account"] else None,
        unprotected_rounds=tuple(rec["unprotected_rounds"]),
        evaluated=tuple(rec["evaluated"]),
        flower_runs=tuple(rec["flower_runs"]),
        secure_steps=tuple((int(i), float(z)) for i, z in rec.get("secure_steps", [])),
    )


@contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the state folder's lock: two runs at one site must not interleave read and write."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = (state_dir / LOCK_FILE).open("a")
    except OSError as err:
        raise LedgerError(
            f"Cannot use the state folder {state_dir} ({err}); nothing is sent "
            "until the privacy ledger can be written there."
        ) from err
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def load_ledger(state_dir: Path) -> Ledger:
    """Read the ledger (an absent file is an empty ledger: a site's first run)."""
    path = state_dir / LEDGER_FILE
    if not path.exists():
        return Ledger()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        runs = {rid: _entry_from_json(rec) for rid, rec in data["runs"].items()}
    except (ValueError, KeyError, TypeError) as err:
        raise LedgerError(
            f"The privacy ledger {path} is unreadable ({err}). It records what this site has "
            "spent: restore it from a backup; do not delete it."
        ) from err
    return Ledger(runs)


def save_ledger(state_dir: Path, ledger: Ledger) -> None:
    """Write the ledger atomically and make the rename durable."""
    data = {
        "version": FORMAT_VERSION,
        "runs": {rid: _entry_to_json(rec) for rid, rec in sorted(ledger.runs.items())},
    }
    payload = (json.dumps(data, indent=1) + "\n").encode()
    guarded_write(
        lambda: atomic_write_bytes(state_dir / LEDGER_FILE, payload, durable=True), state_dir
    )


def guarded_write(write: Callable[[], None], state_dir: Path) -> None:
    """Run a write into the state folder; an OSError becomes a LedgerError (nothing is sent)."""
    try:
        write()
    except OSError as err:
        raise LedgerError(
            f"Cannot write the privacy ledger in {state_dir} ({err}); "
            "nothing is sent until it can be written."
        ) from err
