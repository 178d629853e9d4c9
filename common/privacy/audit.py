"""A site's privacy audit: its spend per run and round, re-derived from its receipts alone.

For every charge (a round's training, an evaluation's or a training loss's release): what the
receipt says it spent and what a fresh Opacus accountant computes from the receipts; both are
checked against the ledger (`fedfusion privacy report <state-dir>` prints it,
`tools.privacy_cli`). With `budget-scope = "dataset"` a run composes with the earlier runs on
every version that shares records with its own (`common.privacy.lineage`), as the site did. And,
for an operator who lost the ledger, its rebuild from the receipts (`rebuild_ledger`), recorded
in the folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from common.files import append_line_atomic
from common.privacy.accounting import Account, HistoryEntry, epsilon_from_history
from common.privacy.ledger import (
    LEDGER_FILE,
    Ledger,
    LedgerError,
    RunEntry,
    load_ledger,
    save_ledger,
)
from common.privacy.lineage import known_keys, related
from common.privacy.receipts import EVALUATE, TRAIN, Receipt, read_receipts

TOLERANCE = 1e-6


@dataclass(frozen=True)
class AuditRow:
    """One receipt and the epsilons re-derived from the receipts before and including it."""

    receipt: Receipt
    epsilon: float | None  # this run's, recomputed
    scope_epsilon: float | None  # over the budget scope, recomputed

    @property
    def ok(self) -> bool:
        """The receipt's numbers equal the recomputation."""
        return _close(self.receipt.epsilon, self.epsilon) and _close(
            self.receipt.scope_epsilon, self.scope_epsilon
        )


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def _merged(entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """Merge consecutive steps at the same noise and rate, as Opacus' accountants do."""
    out: list[HistoryEntry] = []
    for sigma, q, steps in entries:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


@dataclass(frozen=True)
class Audit:
    """Every receipt with its recomputed epsilons, and each disagreement with the ledger."""

    rows: list[AuditRow]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """Every receipt agrees with the recomputation and the ledger."""
        return all(r.ok for r in self.rows) and not self.problems


def related_datasets(state_dir: Path, receipts: list[Receipt]) -> dict[str, set[str]]:
    """For each dataset version of the receipts, the versions sharing records with it."""
    versions = list(dict.fromkeys(r.dataset_sha256 for r in receipts))
    return {v: related(state_dir, v, known_keys(state_dir, v), versions) for v in versions}


def audit(state_dir: Path) -> Audit:
    """Re-derive every receipt's epsilon and compare the receipts with the ledger."""
    receipts = read_receipts(state_dir)
    shares = related_datasets(state_dir, receipts)
    rows, seen = [], []
    for r in receipts:
        seen.append(r)
        if r.epsilon is None:  # a round trained without DP
            rows.append(AuditRow(r, None, None))
            continue
        own = _merged(
            [
                (x.noise_multiplier, x.sample_rate, x.steps)
                for x in seen
                if x.run_id == r.run_id and x.epsilon is not None
            ]
        )
        prior = [
            (x.noise_multiplier, x.sample_rate, x.steps)
            for x in seen
            if r.budget_scope == "dataset"
            and x.run_id != r.run_id
            and x.dataset_sha256 in shares[r.dataset_sha256]
            and x.epsilon is not None
        ]
        # a receipt with an epsilon carries its account's delta too (`Books._receipt` sets both
        # from the account), so it is a float here
        delta = cast(float, r.delta)
        rows.append(
            AuditRow(
                r,
                epsilon_from_history(own, delta=delta, accountant=r.accountant),
                epsilon_from_history([*_merged(prior), *own], delta=delta, accountant=r.accountant),
            )
        )
    return Audit(rows, _ledger_mismatches(load_ledger(state_dir), receipts))


def _ledger_mismatches(ledger: Ledger, receipts: list[Receipt]) -> list[str]:
    problems = []
    for run_id, entry in ledger.runs.items():
        mine = [r for r in receipts if r.run_id == run_id]
        trained = [r.round for r in mine if r.kind == TRAIN]
        if trained != list(entry.rounds):
            problems.append(
                f"run {run_id}: the ledger lists rounds {list(entry.rounds)}, the "
                f"receipts {trained}."
            )
        evaluated = [r.round for r in mine if r.kind == EVALUATE]
        if not set(evaluated) <= set(entry.evaluated):
            problems.append(
                f"run {run_id}: the receipts charge evaluations of rounds {evaluated}, "
                f"the ledger lists {list(entry.evaluated)}."
            )
        if entry.account and sum(r.steps for r in mine) != entry.account.steps:
            problems.append(
                f"run {run_id}: the ledger holds {entry.account.steps} steps, the "
                f"receipts {sum(r.steps for r in mine)}."
            )
    for run_id in sorted({r.run_id for r in receipts} - set(ledger.runs)):
        problems.append(f"run {run_id}: receipts without a ledger entry.")
    return problems


RESETS_FILE = "resets.jsonl"  # every rebuild of the ledger, in the state folder


def rebuild_ledger(state_dir: Path, *, reason: str) -> Ledger:
    """A ledger rebuilt from the receipts (no spend is forgotten), recorded in resets.jsonl.

    For an operator whose `ledger.json` was lost while its receipts remain: the site refuses to
    train until the ledger exists again. Each run's account is the composition of its receipts;
    a damaged ledger file is kept beside it, renamed, never deleted.
    """
    if not reason.strip():
        raise LedgerError("Say why the ledger is rebuilt (--reason): the record is for your DPO.")
    receipts = read_receipts(state_dir)
    if not receipts:
        raise LedgerError(f"{state_dir} holds no receipts: there is no spend to rebuild from.")
    path = state_dir / LEDGER_FILE
    kept = None
    if path.exists():
        try:
            load_ledger(state_dir)
        except LedgerError:
            kept = path.with_name(f"{LEDGER_FILE}.damaged-{Receipt.now()}")
            path.rename(kept)
        else:
            raise LedgerError(
                f"{path} is readable: nothing to rebuild (it is the record of spend)."
            )
    ledger = Ledger()
    for run_id in dict.fromkeys(r.run_id for r in receipts):
        ledger = ledger.with_run(
            run_id, _entry_from_receipts([r for r in receipts if r.run_id == run_id])
        )
    save_ledger(state_dir, ledger)
    event = {
        "time": Receipt.now(),
        "action": "ledger rebuilt from receipts",
        "reason": reason,
        "runs": len(ledger.runs),
        "receipts": len(receipts),
        "damaged_ledger_kept_as": kept.name if kept else None,
    }
    append_line_atomic(state_dir / RESETS_FILE, json.dumps(event), durable=True)
    return ledger


def _entry_from_receipts(receipts: list[Receipt]) -> RunEntry:
    """One run's ledger entry from its receipts."""
    private = [r for r in receipts if r.epsilon is not None]
    trained = [r for r in receipts if r.kind == TRAIN]
    account = None
    if private:
        steps = [r for r in private if r.kind == TRAIN] or private
        releases = [r for r in private if r.kind != TRAIN]
        account = Account(
            accountant=private[-1].accountant,
            delta=float(private[-1].delta or 0.0),
            noise_multiplier=steps[-1].noise_multiplier,
            sample_rate=steps[-1].sample_rate,
            release_noise_multiplier=releases[-1].noise_multiplier if releases else 0.0,
        ).after(_merged([(r.noise_multiplier, r.sample_rate, r.steps) for r in private]))
    return RunEntry(
        dataset=receipts[-1].dataset_sha256,
        account=account,
        rounds=tuple(r.round for r in trained),
        unprotected_rounds=tuple(r.round for r in trained if r.epsilon is None),
        evaluated=tuple(r.round for r in receipts if r.kind == EVALUATE),
    )
