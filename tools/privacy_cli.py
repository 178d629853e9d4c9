"""`fedfusion privacy`: a site's privacy, by hand: audit its receipts, check a policy file, audit a
model for membership inference on the site's own data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.privacy.accounting import epsilon_from_history
from common.privacy.audit import Audit, audit, rebuild_ledger, related_datasets
from common.privacy.ledger import LedgerError
from common.privacy.policy import PolicyError, load_policy


def build_parser() -> argparse.ArgumentParser:
    """The `report`, `check-policy`, `rebuild-ledger` and `audit` subcommands."""
    p = argparse.ArgumentParser(
        prog="fedfusion privacy",
        description="A site's privacy: audit its receipts, check a policy.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    report = sub.add_parser(
        "report",
        help="print the site's spend per run and round, "
        "re-derived from its receipts (exit 1 on disagreement)",
    )
    report.add_argument("state_dir", type=Path, help="the site's state-dir (node config)")
    check = sub.add_parser("check-policy", help="read a policy file and print what it allows")
    check.add_argument("policy", type=Path, help="the site's policy TOML file")
    rebuild = sub.add_parser(
        "rebuild-ledger",
        help="rebuild a lost ledger.json from the receipts "
        "(recorded in resets.jsonl); the site refuses "
        "to train until its ledger exists",
    )
    rebuild.add_argument("state_dir", type=Path, help="the site's state-dir (node config)")
    rebuild.add_argument("--reason", required=True, help="why (kept in resets.jsonl for the DPO)")
    mia = sub.add_parser(
        "audit",
        help="membership-inference audit of a run's final model on this "
        "site's data (loss-threshold and likelihood-ratio attacks)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mia.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the run folder holding model.safetensors + model.json",
    )
    mia.add_argument("--manifest", type=Path, required=True, help="the site's manifest")
    mia.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="the site's validation fraction (node config val-fraction)",
    )
    mia.add_argument("--split-seed", type=int, default=0, help="node config split-seed")
    mia.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the site's state-dir: the bound uses the run's epsilon from its ledger",
    )
    mia.add_argument("--epsilon", type=float, default=None, help="the bound's epsilon, by hand")
    mia.add_argument("--delta", type=float, default=None, help="the bound's delta, by hand")
    mia.add_argument("--reference-models", type=int, default=8, help="LiRA reference models")
    mia.add_argument("--seed", type=int, default=0, help="seed of the references' halves")
    mia.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    mia.add_argument(
        "--out",
        type=Path,
        default=Path("membership-audit.html"),
        help="the audit page (.html or .md); it names records: keep it at the site",
    )
    return p


def _membership(args: argparse.Namespace) -> int:
    """`fedfusion privacy audit`: print the table, write the page."""
    import logging

    from common.errors import FedFusionError
    from common.privacy.membership import AuditDataError
    from tools.membership_report import audit_site, format_table, write_page

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.reference_models < 2:
        print("error: --reference-models must be at least 2.", file=sys.stderr)
        return 2
    try:
        site = audit_site(
            args.model,
            args.manifest,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            state_dir=args.state_dir,
            epsilon=args.epsilon,
            delta=args.delta,
            reference_models=args.reference_models,
            seed=args.seed,
            device=args.device,
        )
    except (FedFusionError, AuditDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(site))
    print(f"\npage: {write_page(site, args.out)} (it names records: keep it at the site)")
    return 0


def main(argv: list[str]) -> int:
    """Run `fedfusion privacy <action>`; exit 1 on a disagreement, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if args.action == "audit":
        return _membership(args)
    if args.action == "check-policy":
        try:
            policy = load_policy(args.policy)
        except PolicyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{args.policy}: valid.")
        for key, value in vars(policy).items():
            print(f"  {key.replace('_', '-')} = {value}")
        if policy.exact_metrics:
            print(
                "warning: exact-metrics = true releases evaluation metrics (and, with "
                "share-train-loss, the training loss) exactly, outside the DP guarantee: meant "
                "for a simulation whose researcher plays every party."
            )
        return 0
    if args.action == "rebuild-ledger":
        try:
            ledger = rebuild_ledger(args.state_dir, reason=args.reason)
        except LedgerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(
            f"{args.state_dir}/ledger.json rebuilt from the receipts: {len(ledger.runs)} run(s); "
            "recorded in resets.jsonl."
        )
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

    lines = [
        f"Privacy receipts in {state_dir}",
        "",
        f"{'run':<22} {'round':>5} {'charge':>10} {'sigma':>8} {'q':>7} {'steps':>5} "
        f"{'epsilon':>9} {'recomputed':>10} {'delta':>7} {'scope':>8} {'scope eps':>9}  "
        "sent sha256     check",
    ]
    for row in rows:
        r = row.receipt
        lines.append(
            f"{r.run_id[:22]:<22} {r.round:>5} {r.kind:>10} {r.noise_multiplier:>8.4f} "
            f"{r.sample_rate:>7.4f} "
            f"{r.steps:>5} {num(r.epsilon):>9} {num(row.epsilon):>10} "
            f"{'-' if r.delta is None else format(r.delta, '.0e'):>7} {r.budget_scope:>8} "
            f"{num(r.scope_epsilon):>9}  {r.update_sha256[:14]}  {'ok' if row.ok else 'MISMATCH'}"
        )
    lines.append("")
    shares = related_datasets(state_dir, [row.receipt for row in rows])
    for dataset, sharing in shares.items():
        entries = [
            (row.receipt.noise_multiplier, row.receipt.sample_rate, row.receipt.steps)
            for row in rows
            if row.receipt.dataset_sha256 in sharing and row.epsilon is not None
        ]
        last = [row.receipt for row in rows if row.receipt.dataset_sha256 == dataset][-1]
        total = epsilon_from_history(
            entries, delta=last.delta or 1e-5, accountant=last.accountant if entries else "rdp"
        )
        others = len(sharing) - 1
        lines.append(
            f"dataset {dataset[:12]}: all runs on its records together spend epsilon "
            f"{total:.4f} at delta {last.delta if last.delta is not None else '-'}"
            + (f" (with {others} other version(s) sharing records)." if others else ".")
        )
    lines += [f"PROBLEM: {p}" for p in problems]
    bad = sum(not row.ok for row in rows) + len(problems)
    lines.append(
        "All receipts agree with the recomputation and the ledger."
        if not bad
        else f"{bad} disagreement(s): the ledger or receipts were altered or are damaged."
    )
    return "\n".join(lines)
