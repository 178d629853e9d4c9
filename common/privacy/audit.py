"""A site's privacy audit: its spend per run and round, re-derived from its receipts alone.

For every round the site trained: what the receipt says it spent and what a fresh Opacus
accountant computes from the receipts; both are checked against the ledger
(`fedfusion privacy report <state-dir>` prints it, `tools.privacy_cli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.privacy.accounting import HistoryEntry, epsilon_from_history
from common.privacy.ledger import Ledger, load_ledger
from common.privacy.receipts import Receipt, read_receipts

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
            self.receipt.scope_epsilon, self.scope_epsilon)


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


def audit(state_dir: Path) -> Audit:
    """Re-derive every receipt's epsilon and compare the receipts with the ledger."""
    receipts = read_receipts(state_dir)
    rows, seen = [], []
    for r in receipts:
        seen.append(r)
        if r.epsilon is None:  # a round trained without DP
            rows.append(AuditRow(r, None, None))
            continue
        own = _merged([(x.noise_multiplier, x.sample_rate, x.steps) for x in seen
                       if x.run_id == r.run_id and x.epsilon is not None])
        prior = [(x.noise_multiplier, x.sample_rate, x.steps) for x in seen
                 if r.budget_scope == "dataset" and x.run_id != r.run_id
                 and x.dataset_sha256 == r.dataset_sha256 and x.epsilon is not None]
        kw = dict(delta=r.delta, accountant=r.accountant)
        rows.append(AuditRow(r, epsilon_from_history(own, **kw),
                             epsilon_from_history([*_merged(prior), *own], **kw)))
    return Audit(rows, _ledger_mismatches(load_ledger(state_dir), receipts))


def _ledger_mismatches(ledger: Ledger, receipts: list[Receipt]) -> list[str]:
    problems = []
    for run_id, entry in ledger.runs.items():
        mine = [r for r in receipts if r.run_id == run_id]
        if [r.round for r in mine] != list(entry.rounds):
            problems.append(f"run {run_id}: the ledger lists rounds {list(entry.rounds)}, the "
                            f"receipts {[r.round for r in mine]}.")
        if entry.account and sum(r.steps for r in mine) != entry.account.steps:
            problems.append(f"run {run_id}: the ledger holds {entry.account.steps} steps, the "
                            f"receipts {sum(r.steps for r in mine)}.")
    for run_id in sorted({r.run_id for r in receipts} - set(ledger.runs)):
        problems.append(f"run {run_id}: receipts without a ledger entry.")
    return problems
