"""A site's privacy audit: its spend per run and round, re-derived from its receipts alone.

`fedfusion privacy report <state-dir>` prints, for every round the site trained, what the
receipt says it spent and what a fresh Opacus accountant computes from the receipts; it checks
both against the ledger, and exits non-zero on any disagreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.ledger import LedgerBook, Receipt, load_book, read_receipts
from common.privacy import HistoryEntry, epsilon_from_history

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


def audit(state_dir: Path) -> tuple[list[AuditRow], list[str]]:
    """Re-derive every receipt's epsilon; also return disagreements with the ledger."""
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
    return rows, _ledger_mismatches(load_book(state_dir), receipts)


def _ledger_mismatches(book: LedgerBook, receipts: list[Receipt]) -> list[str]:
    problems = []
    for run_id, record in book.runs.items():
        mine = [r for r in receipts if r.run_id == run_id]
        if [r.round for r in mine] != list(record.rounds):
            problems.append(f"run {run_id}: the ledger lists rounds {list(record.rounds)}, the "
                            f"receipts {[r.round for r in mine]}.")
        if record.ledger and sum(r.steps for r in mine) != record.ledger.steps:
            problems.append(f"run {run_id}: the ledger holds {record.ledger.steps} steps, the "
                            f"receipts {sum(r.steps for r in mine)}.")
    for run_id in sorted({r.run_id for r in receipts} - set(book.runs)):
        problems.append(f"run {run_id}: receipts without a ledger entry.")
    return problems


def format_report(state_dir: Path, rows: list[AuditRow], problems: list[str]) -> str:
    """The report as a table, run by run, with a verdict per row."""
    if not rows:
        return f"No receipts in {state_dir}: this site has not trained yet."

    def num(v: float | None, fmt: str = ".4f") -> str:
        return "no DP" if v is None else format(v, fmt)

    lines = [f"Privacy receipts in {state_dir}", "",
             f"{'run':<22} {'round':>5} {'sigma':>8} {'q':>7} {'steps':>5} {'epsilon':>9} "
             f"{'recomputed':>10} {'delta':>7} {'scope':>8} {'scope eps':>9}  update sha256   check"]
    for row in rows:
        r = row.receipt
        lines.append(
            f"{r.run_id[:22]:<22} {r.round:>5} {r.noise_multiplier:>8.4f} {r.sample_rate:>7.4f} "
            f"{r.steps:>5} {num(r.epsilon):>9} {num(row.epsilon):>10} "
            f"{'-' if r.delta is None else format(r.delta, '.0e'):>7} {r.budget_scope:>8} "
            f"{num(r.scope_epsilon):>9}  {r.update_sha256[:14]}  {'ok' if row.ok else 'MISMATCH'}")
    lines.append("")
    for dataset in dict.fromkeys(row.receipt.dataset_sha256 for row in rows):
        entries = [(row.receipt.noise_multiplier, row.receipt.sample_rate, row.receipt.steps)
                   for row in rows if row.receipt.dataset_sha256 == dataset and row.epsilon is not None]
        last = [row.receipt for row in rows if row.receipt.dataset_sha256 == dataset][-1]
        total = epsilon_from_history(entries, delta=last.delta or 1e-5,
                                     accountant=last.accountant if entries else "rdp")
        lines.append(f"dataset {dataset[:12]}: all runs together spend epsilon {total:.4f} at "
                     f"delta {last.delta if last.delta is not None else '-'}.")
    lines += [f"PROBLEM: {p}" for p in problems]
    bad = sum(not row.ok for row in rows) + len(problems)
    lines.append("All receipts agree with the recomputation and the ledger." if not bad
                 else f"{bad} disagreement(s): the ledger or receipts were altered or are damaged.")
    return "\n".join(lines)
