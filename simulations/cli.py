"""`fedfusion simulate` / `python -m simulations`: the local multi-hospital run and its report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import FUSION_MODES, PRESET_NAMES, ConfigError, default_user_config
from common.errors import FedFusionError
from common.runfolder import STATUS_COMPLETED, HistoryLine, Summary
from common.views.round_views import format_round_table
from simulations.demo_data import DEMO_TABULAR_FIELDS

log = logging.getLogger(__name__)
OUR_PACKAGES = ("common", "client", "server", "simulations")


def build_parser(defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """Options of the simulation command; each overrides its run-config key only when given."""
    p = argparse.ArgumentParser(
        prog="fedfusion simulate",
        description="Run a federation of simulated hospitals on this machine (Flower simulation "
        "runtime). Without --data-root, demo hospitals are generated in ./demo-data "
        "and their structured fields declared (tabular-fields). "
        "Options left out take their run-config defaults from [tool.flwr.app.config].",
    )
    p.add_argument(
        "--hospitals", type=int, default=3, help="number of simulated hospitals (default: 3)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"federated rounds (num-server-rounds; default {defaults['num-server-rounds']})",
    )
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help=f"model preset (preset; default {defaults['preset']})",
    )
    p.add_argument(
        "--fusion",
        choices=FUSION_MODES,
        default=None,
        help=f"fusion mode (fusion; default {defaults['fusion']})",
    )
    p.add_argument(
        "--no-dp",
        action="store_true",
        help="train without differential privacy (dp = false; hospitals whose "
        "policy.toml requires DP still refuse)",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help=f"per-site target epsilon for the run (target-epsilon; default "
        f"{defaults['target-epsilon']})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"model initialisation and demo-data seed (seed; default {defaults['seed']})",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder of hospital-<i>/ sites (default: ./demo-data, generated if absent)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where run folders go (output-dir; default {defaults['output-dir']})",
    )
    p.add_argument(
        "--run-name",
        default=None,
        help="run folder name (run-name; default: time-stamped); the name of an "
        "interrupted run resumes it after its last finished round",
    )
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other [tool.flwr.app.config] key, e.g. -c local-epochs=2 (repeatable)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    return p


def parse_override(item: str, defaults: dict[str, Any]) -> tuple[str, Any]:
    """`key=value` -> (key, value cast like the key's default)."""
    if "=" not in item:
        raise ConfigError(f"--run-config expects KEY=VALUE, got {item!r}.")
    key, raw = (s.strip() for s in item.split("=", 1))
    default = defaults.get(key)
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"Run config key '{key}' expects true or false, got {raw!r}.")
        return key, raw.lower() == "true"
    try:
        if isinstance(default, int):
            return key, int(raw)
        if isinstance(default, float):
            return key, float(raw)
    except ValueError as err:
        raise ConfigError(
            f"Run config key '{key}' expects a {type(default).__name__}, got {raw!r}."
        ) from err
    return key, raw


def user_config_from_args(
    args: argparse.Namespace, data_root: Path, defaults: dict[str, Any]
) -> dict[str, Any]:
    """The full run config: pyproject's defaults, then the options given, then --run-config."""
    cfg = dict(defaults)
    given = {
        "num-server-rounds": args.rounds,
        "preset": args.preset,
        "fusion": args.fusion,
        "target-epsilon": args.epsilon,
        "seed": args.seed,
        "run-name": args.run_name,
        "output-dir": str(args.output_dir.resolve()) if args.output_dir else None,
    }
    cfg.update({k: v for k, v in given.items() if v is not None})
    if args.no_dp:
        cfg["dp"] = False
    cfg["data-root"] = str(data_root.resolve())
    cfg["min-nodes"] = min(args.hospitals, cfg["min-nodes"])  # a smaller federation can still run
    if args.data_root is None:  # the generated demo hospitals: three modalities (-c overrides)
        cfg["tabular-fields"] = DEMO_TABULAR_FIELDS
    cfg.update(dict(parse_override(item, defaults) for item in args.run_config))
    for key in ("output-dir", "state-root"):  # the apps do not run in this working directory
        if cfg[key]:
            cfg[key] = str(Path(cfg[key]).expanduser().resolve())
    return cfg


def format_history(history: list[HistoryLine]) -> str:
    """Every round's table (as the server logs it): per site, the aggregate, refusals, failures."""
    return "\n\n".join(f"round {h.round}\n{format_round_table(h)}" for h in history)


def format_privacy(summary: Summary) -> str:
    """Each site's own privacy spend over the run (never averaged across sites)."""
    lines = [
        f"{'site':<16} {'epsilon':>8} {'delta':>8} {'sigma':>7} {'steps':>6}  rounds trained"
        f" / refused / failed / rejected"
    ]
    for name, s in summary.sites.items():
        eps = "-" if not s.rounds_trained else ("off" if s.epsilon is None else f"{s.epsilon:.3f}")
        delta = "-" if s.delta in (None, 0.0) else f"{s.delta:.0e}"
        sigma = "-" if not s.noise_multiplier else f"{s.noise_multiplier:.3f}"
        lines.append(
            f"{name:<16} {eps:>8} {delta:>8} {sigma:>7} {s.steps:>6}  "
            f"{s.rounds_trained} / {s.rounds_refused} / {s.rounds_failed} / "
            f"{s.rounds_rejected}"
        )
    return "\n".join(lines)


def log_round(line: HistoryLine) -> None:
    """Log a round's table as soon as its history line is written (the coordinator's view)."""
    log.info("round %d\n%s", line.round, format_round_table(line))


def quiet_flower(*, verbose: bool) -> None:
    """Flower logs through its own handler: show only its warnings unless --verbose.

    Must run before flwr is imported (Flower reads FLWR_LOG_LEVEL at import).
    """
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("flwr").propagate = False  # it has its own console handler


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and print its report; return the exit code."""
    try:
        defaults = default_user_config()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = build_parser(defaults).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
    quiet_flower(verbose=args.verbose)
    from simulations.run import prepare_demo_data, simulate

    start = time.perf_counter()
    try:
        if args.hospitals < 1 or (args.rounds is not None and args.rounds < 1):
            raise ConfigError("--hospitals and --rounds must be at least 1.")
        data_root = args.data_root or Path("demo-data")
        cfg = user_config_from_args(args, data_root, defaults)
        if args.data_root is None:
            prepare_demo_data(data_root, args.hospitals, int(cfg["seed"]))
        folder = simulate(cfg, args.hospitals, verbose=args.verbose, on_round=log_round)
    except FedFusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: the simulation failed: {err}", file=sys.stderr)
        return 1
    print()
    print(format_history(folder.read_history()[-1:]))  # the last round; every round was logged
    summary = folder.read_summary()
    if summary is None:
        print(f"error: the run wrote no summary to {folder.path}.", file=sys.stderr)
        return 1
    print("\nPrivacy per site (cumulative over this run):")
    print(format_privacy(summary))
    print(
        f"\n{summary.message} Finished in {time.perf_counter() - start:.0f} s. "
        f"Outputs in {folder.path}/ (history.jsonl, summary.json, plots *.png, "
        f"round-NNN.safetensors, model.safetensors + model.json). "
        f"Report: fedfusion report {folder.path}"
    )
    if summary.status != STATUS_COMPLETED:
        print(f"error: {summary.message}", file=sys.stderr)
        return 1
    return 0
