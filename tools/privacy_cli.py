"""`fedfusion privacy`: a site's privacy, by hand: audit its receipts, check a policy file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.privacy.accounting import epsilon_from_history
from common.privacy.audit import Audit, audit, rebuild_ledger
from common.privacy.ledger import LedgerError
from common.privacy.policy import PolicyError, load_policy


def build_parser() -> argparse.ArgumentParser:
    """The `report` and `check-policy` subcommands."""
    p = argparse.ArgumentParser(prog="fedfusion privacy",
                                description="A site's privacy: audit its receipts, check a policy.")
    sub = p.add_subparsers(dest="action", required=True)
    report = sub.add_parser("report", help="print the site's spend per run and round, "
                                           "re-derived from its receipts (exit 1 on disagreement)")
    report.add_argument("state_dir", type=Path, help="the site's state-dir (node config)")
    check = sub.add_parser("check-policy", help="read a policy file and print what it allows")
    check.add_argument("policy", type=Path, help="the site's policy TOML file")
    rebuild = sub.add_parser("rebuild-ledger", help="rebuild a lost ledger.json from the receipts "
                                                    "(recorded in resets.jsonl); the site refuses "
                                                    "to train until its ledger exists")
    rebuild.add_argument("state_dir", type=Path, help="the site's state-dir (node config)")
    rebuild.add_argument("--reason", required=True, help="why (kept in resets.jsonl for the DPO)")
    return p


def main(argv: list[str]) -> int:
    """Run `fedfusion privacy report|check-policy`; exit 1 on a disagreement, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if args.action == "check-policy":
        try:
            policy = load_policy(args.policy)
        except PolicyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{args.policy}: valid.")
        for key, value in vars(policy).items():
            print(f"  {key.replace('_', '-')} = {value}")
        return 0
    if args.action == "rebuild-ledger":
        try:
            ledger = rebuild_ledger(args.state_dir, reason=args.reason)
        except LedgerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{args.state_dir}/ledger.json rebuilt from the receipts: {len(ledger.runs)} run(s); "
              "recorded in resets.jsonl.")
        return 0
    if not args.state_dir.is_dir():
        print(f"error: {args.state_dir} is not a folder (a site's state-dir).", file=sys.stderr)
        return 2
    try:
        result = audit(args.state_dir)
    except LedgerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(args.state_dir, result))
    return 0 if result.ok else 1


def format_report(state_dir: Path, result: Audit) -> str:
    """The report as a table, run by run, with a verdict per row."""
    rows, problems = result.rows, result.problems
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
