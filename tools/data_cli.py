"""`fedfusion data`: check a site's manifest, or partition a pooled one into simulated hospitals."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.config import ConfigError, default_user_config, run_config_with
from common.data.manifest import ManifestError


def build_parser() -> argparse.ArgumentParser:
    """The `check` and `partition` subcommands; class names default to the run config's."""
    default_classes = str(default_user_config()["class-names"])
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="fedfusion data",
        description="A site's data: check a manifest, "
        "or partition a pooled one into simulated hospitals.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser(
        "check",
        formatter_class=fmt,
        help="check every row and image of a manifest; exit 1 on any problem",
    )
    check.add_argument("manifest", type=Path, help="a manifest file, or a folder holding one")
    check.add_argument(
        "--class-names",
        default=default_classes,
        help="the run's labels, comma-separated (run config key class-names)",
    )
    check.add_argument(
        "--tabular-fields",
        default=str(default_user_config()["tabular-fields"]),
        help="the structured fields' schema (run config key tabular-fields), "
        'for example "age:numeric:0:120;sex:categorical:F|M"',
    )
    part = sub.add_parser(
        "partition",
        formatter_class=fmt,
        help="split a pooled manifest into "
        "<out>/hospital-<i>/ folders for `fedfusion simulate --data-root <out>`",
    )
    part.add_argument("manifest", type=Path, help="the pooled manifest (file or folder)")
    part.add_argument("out", type=Path, help="output folder (must be absent or empty)")
    part.add_argument("--hospitals", type=int, default=3, help="number of hospitals N")
    part.add_argument(
        "--scheme",
        choices=("iid", "dirichlet", "size", "natural"),
        default="iid",
        help="iid; dirichlet: label skew; size: exponential size skew; natural: one "
        "hospital per value of --column",
    )
    part.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="dirichlet concentration: smaller = more label skew",
    )
    part.add_argument(
        "--column",
        default="site",
        help="natural: the manifest column that names "
        "each row's origin (a patient's rows must agree)",
    )
    part.add_argument("--seed", type=int, default=0, help="random seed (same seed, same partition)")
    part.add_argument(
        "--drop-text",
        default="",
        metavar="I,J",
        help="hospital indices whose reports are removed (image-only sites); empty: none",
    )
    part.add_argument(
        "--drop-images",
        default="",
        metavar="I,J",
        help="hospital indices whose images are removed (text-only sites); empty: none",
    )
    part.add_argument(
        "--drop-fields",
        default="",
        metavar="I,J",
        help="hospital indices whose structured fields are removed (sites without them); "
        "empty: none",
    )
    part.add_argument(
        "--class-names",
        default=default_classes,
        help="the run's labels, comma-separated (every row is checked first)",
    )
    part.add_argument(
        "--tabular-fields",
        default=str(default_user_config()["tabular-fields"]),
        help="the structured fields' schema (run config key tabular-fields): their cells are "
        "checked, and a row holding only fields is kept",
    )
    return p


def main(argv: list[str]) -> int:
    """Run `fedfusion data check|partition`; exit 1 on bad data, 2 on bad options."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        class_names = run_config_with({"class-names": args.class_names}).model.class_names
        return (
            _check(args, class_names) if args.action == "check" else _partition(args, class_names)
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace, class_names: tuple[str, ...]) -> int:
    from common.data.check import check_manifest, format_report

    fields = run_config_with({"tabular-fields": args.tabular_fields}).model.tabular
    report = check_manifest(args.manifest, class_names, fields=fields)
    print(format_report(report))
    return 0 if report.ok else 1


def _partition(args: argparse.Namespace, class_names: tuple[str, ...]) -> int:
    from simulations.partition import (
        PartitionError,
        PartitionPlan,
        format_partition,
        partition_manifest,
    )

    try:
        plan = PartitionPlan(
            args.hospitals,
            args.scheme,
            args.alpha,
            args.column,
            args.seed,
            _indices(args.drop_text, "--drop-text"),
            _indices(args.drop_images, "--drop-images"),
            _indices(args.drop_fields, "--drop-fields"),
        )
        fields = run_config_with({"tabular-fields": args.tabular_fields}).model.tabular
        summaries = partition_manifest(args.manifest, args.out, plan, class_names, fields)
    except PartitionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_partition(args.out, plan, summaries, class_names, args.tabular_fields))
    return 0


def _indices(text: str, option: str) -> tuple[int, ...]:
    """'2,3' -> (2, 3) for a hospital-index option."""
    from simulations.partition import PartitionError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise PartitionError(
            f"{option} takes hospital indices separated by commas, e.g. 0,2; got {text!r}."
        ) from err
