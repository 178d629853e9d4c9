"""The `fedfusion` command: one entry point for the things a user runs by hand.

Each command imports what it needs when it runs, so `fedfusion predict` never loads Flower and
`fedfusion --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import FedFusionError

if TYPE_CHECKING:  # imported where it runs: `fedfusion --help` loads no torch
    from tools.predict import Predictor


def _demo_data(argv: list[str]) -> int:
    from simulations.demo_data import write_demo_hospitals

    p = argparse.ArgumentParser(
        prog="fedfusion demo-data",
        description="Write synthetic demo hospitals in the site format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("root", type=Path, help="folder to write hospital-<i>/ into")
    p.add_argument("--hospitals", type=int, default=3, help="number of hospitals")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size-scale", type=float, default=1.0, help="multiply every hospital's size")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for manifest in write_demo_hospitals(args.root, args.hospitals, args.seed, args.size_scale):
        print(manifest)
    return 0


def _privacy(argv: list[str]) -> int:
    from tools.privacy_cli import main

    return main(argv)


def _data(argv: list[str]) -> int:
    from tools.data_cli import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from tools.report import FORMATS, write_report

    p = argparse.ArgumentParser(
        prog="fedfusion report",
        description="Write a self-contained run report (plots embedded): "
        "sites, rounds, final metrics, the model, and each "
        "site's privacy guarantee in words.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="the run folder, e.g. outputs/<run-name>")
    p.add_argument("--format", choices=FORMATS, default="html", help="report format")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the report file; None: report.<format> inside the run folder",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        path = write_report(args.run_dir, args.format, args.out)
    except FedFusionError as err:  # ReportError, a damaged run folder
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedfusion predict",
        description="Class probabilities from a run's final model (no Flower needed): one case "
        "(--image and/or --text), or every row of a manifest (--manifest) written to a "
        "CSV, with metrics when the manifest has labels. A missing modality is masked "
        "as in training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        default=argparse.SUPPRESS,
        help="(required) the run folder holding model.safetensors + model.json, "
        "e.g. outputs/<run-name>",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="one case: its image (PNG/JPEG/DICOM); None: the case has no image",
    )
    p.add_argument("--text", default="", help="one case: its report text; empty: no report")
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="many cases: a manifest in the site format (CSV/JSONL, paths relative to "
        "it; label optional); None: predict one case",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="with --manifest: the CSV of predictions to write",
    )
    p.add_argument("--batch-size", type=int, default=64, help="cases per forward pass")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available",
    )
    p.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="DIR",
        help="also explain the case(s) into DIR: each modality's contribution, the "
        "report's most influential tokens (explanations.html) and an image "
        "attribution heatmap per case (integrated gradients; needs the `explain` "
        "extra: Captum)",
    )
    p.add_argument(
        "--explain-max",
        type=int,
        default=20,
        help="with --explain and --manifest: explain at most this many rows",
    )
    p.add_argument("--ig-steps", type=int, default=64, help="integrated-gradients steps")
    return p


def _explain(args: argparse.Namespace, predictor: Predictor) -> None:
    """`predict --explain`: write the explanations of the case(s) and say where."""
    from common.data.manifest import read_cases
    from tools.explain import explain_cases
    from tools.predict import case_row, cases_dataset

    if args.manifest is None:
        dataset = cases_dataset(predictor, Path.cwd() / "case", [case_row(args.image, args.text)])
    else:
        manifest, rows = read_cases(
            args.manifest, predictor.class_names, fields=predictor.model.config.tabular
        )
        dataset = cases_dataset(predictor, manifest, rows)
    cases = explain_cases(
        predictor, dataset, args.explain, steps=args.ig_steps, max_cases=args.explain_max
    )
    for c in cases:
        m = c.with_modalities
        print(
            f"row {c.line}: {c.prediction}: p {m['both']:.3f} with both, {m['image']:.3f} "
            f"image only, {m['text']:.3f} report only"
        )
    print(f"{len(cases)} explanation(s) written to {args.explain / 'explanations.html'}")


def _predict(argv: list[str]) -> int:
    p = _predict_parser()
    args = p.parse_args(argv)
    if args.manifest is not None and (args.image is not None or args.text):
        p.error("give either --manifest (many cases) or --image/--text (one case), not both.")
    if args.manifest is None and args.image is None and not args.text.strip():
        p.error("nothing to predict: give --image and/or --text for one case, or --manifest.")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1.")
    if args.explain_max < 1 or args.ig_steps < 2:
        p.error("--explain-max must be at least 1 and --ig-steps at least 2.")
    if args.explain is not None and importlib.util.find_spec("captum") is None:
        p.error("--explain needs Captum: pip install 'fedfusion[explain]'.")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from tools.predict import (
        load_predictor,
        predict_case,
        predict_manifest,
        write_predictions_csv,
    )

    try:
        predictor = load_predictor(args.model, args.device)
        if args.manifest is None:
            probs = predict_case(predictor, args.image, args.text)
            for name, prob in probs.items():
                print(f"{name:<20} {prob:.4f}")
            print(f"prediction: {max(probs, key=probs.__getitem__)}")
            if args.explain is not None:
                _explain(args, predictor)
            return 0
        result = predict_manifest(predictor, args.manifest, args.batch_size)
        if args.explain is not None:
            _explain(args, predictor)
    # FedFusionError: PredictError, ManifestError, ModelLoadError, a damaged model.json, no GPU;
    # ValueError: a model.json that is not JSON
    except (FedFusionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_predictions_csv(args.out, result, predictor.class_names)
    print(f"{len(result.rows)} predictions written to {args.out}")
    if result.metrics is not None:
        m = result.metrics
        print(
            f"metrics over {m.num_examples} labelled cases: loss {m.loss:.4f}  accuracy "
            f"{m.accuracy:.4f}  auroc {m.auroc:.4f}  f1 {m.f1:.4f}"
        )
    return 0


class _AppendOverDefault(argparse.Action):
    """Like action="append", but the first use replaces the default list instead of extending it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


def _certs(argv: list[str]) -> int:
    from common.certs import DEFAULT_SANS, CredentialError, write_credentials

    p = argparse.ArgumentParser(
        prog="fedfusion certs",
        description="Create deployment credentials: a CA, the SuperLink's TLS certificate "
        "(ca.crt, server.crt, server.key) and one SuperNode authentication key pair per "
        "hospital (hospitals/<name>/supernode.key, .pub). Private keys get mode 0600.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=Path, help="folder to write the credentials into")
    p.add_argument(
        "--san",
        action=_AppendOverDefault,
        default=list(DEFAULT_SANS),
        metavar="NAME_OR_IP",
        help="a host name or IP address the SuperNodes and `flwr` use to reach the "
        "SuperLink; repeatable, replaces the default (keep localhost and 127.0.0.1: "
        "the SuperLink's own ServerApp process connects through them)",
    )
    p.add_argument(
        "--hospital",
        action="append",
        default=[],
        metavar="NAME",
        help="write a SuperNode key pair for this hospital; repeatable",
    )
    p.add_argument(
        "--days", type=int, default=365, help="validity of the CA and server certificates"
    )
    p.add_argument(
        "--keys-only",
        action="store_true",
        help="write only the hospitals' key pairs (no CA, no server certificate): run it "
        "at the hospital, so its private key never leaves",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing credential files")
    args = p.parse_args(argv)
    try:
        files = write_credentials(
            args.out_dir,
            sans=args.san,
            hospitals=args.hospital,
            days=args.days,
            server=not args.keys_only,
            force=args.force,
        )
    except CredentialError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


def _node(argv: list[str]) -> int:
    from client.node import main

    return main(argv)


def _run(argv: list[str]) -> int:
    from tools.submit import main

    return main(argv)


def _simulate(argv: list[str]) -> int:
    from simulations.cli import main

    return main(argv)


COMMANDS = {
    "simulate": (_simulate, "run a local multi-hospital federation (Flower simulation runtime)"),
    "run": (
        _run,
        "submit a run to a SuperLink (`flwr run --stream`); exit 1 unless it completed",
    ),
    "node": (
        _node,
        "a hospital's node: serves its SuperNode's tasks with the FedFusion installed here",
    ),
    "demo-data": (_demo_data, "write synthetic demo hospitals in the site data format"),
    "data": (_data, "a site's data: `check <manifest>`, `partition <pooled> <out>`"),
    "certs": (_certs, "create TLS certificates and SuperNode keys for a real deployment"),
    "privacy": (
        _privacy,
        "a site's privacy: `report <state-dir>`, `check-policy`, `audit` (membership)",
    ),
    "report": (_report, "write a run's report (HTML or Markdown, plots embedded)"),
    "predict": (
        _predict,
        "class probabilities from a run's final model, for one case or a manifest",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `fedfusion <command> ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: fedfusion <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        print("\nRun `fedfusion <command> --help` for a command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    func, _ = COMMANDS[argv[0]]
    return func(argv[1:])
