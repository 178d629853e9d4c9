"""`fedfusion simulate` / `python -m simulations`: the local multi-hospital run and its report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError, default_user_config

log = logging.getLogger(__name__)
OUR_PACKAGES = ("common", "client", "server", "simulations")


def build_parser() -> argparse.ArgumentParser:
    """Options of the simulation command."""
    p = argparse.ArgumentParser(
        prog="fedfusion simulate",
        description="Run a federation of simulated hospitals on this machine (Flower simulation "
                    "runtime). Without --data-root, demo hospitals are generated in ./demo-data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hospitals", type=int, default=3, help="number of simulated hospitals")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--preset", choices=("tiny", "demo", "seed"), default="demo", help="model preset")
    p.add_argument("--fusion", choices=("concat", "weighted", "attention"), default="concat",
                   help="fusion mode")
    p.add_argument("--no-dp", action="store_true",
                   help="train without differential privacy (hospitals whose policy.toml requires "
                        "DP still refuse)")
    p.add_argument("--epsilon", type=float, default=8.0, help="per-site target epsilon for the run")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and demo-data seed")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder of hospital-<i>/ sites (default: ./demo-data, generated if absent)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where run folders go")
    p.add_argument("--run-name", default="",
                   help="run folder name (default: time-stamped); the name of an interrupted run "
                        "resumes it after its last finished round")
    p.add_argument("--run-config", "-c", action="append", default=[], metavar="KEY=VALUE",
                   help="any other [tool.flwr.app.config] key, e.g. -c local-epochs=2 (repeatable)")
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
        raise ConfigError(f"Run config key '{key}' expects a {type(default).__name__}, got {raw!r}.") from err
    return key, raw


def user_config_from_args(args: argparse.Namespace, data_root: Path) -> dict[str, Any]:
    """The full run config: pyproject defaults, then the options, then --run-config."""
    cfg = default_user_config()
    cfg.update({
        "num-server-rounds": args.rounds, "preset": args.preset, "fusion": args.fusion,
        "dp": not args.no_dp, "target-epsilon": args.epsilon, "seed": args.seed,
        "data-root": str(data_root.resolve()), "output-dir": str(args.output_dir.resolve()),
        "run-name": args.run_name, "min-nodes": min(args.hospitals, cfg["min-nodes"]),
    })
    defaults = default_user_config()
    cfg.update(dict(parse_override(item, defaults) for item in args.run_config))
    return cfg


def format_history(history: list[dict[str, Any]]) -> str:
    """Every round's table (the one the server logs): per site, the aggregate, refusals, failures."""
    from common.round_views import format_round_table

    return "\n\n".join(f"round {h['round']}\n{format_round_table(h)}" for h in history)


def format_privacy(summary: dict[str, Any]) -> str:
    """Each site's own privacy spend over the run (never averaged across sites)."""
    lines = [f"{'site':<16} {'epsilon':>8} {'delta':>8} {'sigma':>7} {'steps':>6}  rounds trained"
             f" / refused / failed / rejected"]
    for name, s in summary["sites"].items():
        eps = "-" if not s["rounds_trained"] else ("off" if s["epsilon"] is None else f"{s['epsilon']:.3f}")
        delta = "-" if s["delta"] in (None, 0.0) else f"{s['delta']:.0e}"
        sigma = "-" if not s["noise_multiplier"] else f"{s['noise_multiplier']:.3f}"
        lines.append(f"{name:<16} {eps:>8} {delta:>8} {sigma:>7} {s['steps']:>6}  "
                     f"{s['rounds_trained']} / {s['rounds_refused']} / {s['rounds_failed']} / "
                     f"{s.get('rounds_rejected', [])}")
    return "\n".join(lines)


def no_dp_policy() -> Path:
    """A policy allowing training without DP, for simulated hospitals that have no policy.toml.

    A site requires DP unless its policy says otherwise; with --no-dp the researcher, who plays
    every simulated hospital, says so for the hospitals without a policy of their own.
    """
    path = Path(tempfile.mkdtemp(prefix="fedfusion-")) / "no-dp-policy.toml"
    path.write_text("require-dp = false\n")
    log.info("--no-dp: simulated hospitals without a policy.toml allow training without DP")
    return path


def quiet_flower(*, verbose: bool) -> None:
    """Flower logs through its own handler: show only its warnings unless --verbose.

    Must run before flwr is imported (Flower reads FLWR_LOG_LEVEL at import).
    """
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("flwr").propagate = False  # it has its own console handler


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and print its report; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
    quiet_flower(verbose=args.verbose)
    from server.history import read_history, read_summary
    from server.resume import ResumeError
    from simulations.run import prepare_demo_data, simulate

    start = time.perf_counter()
    try:
        if args.hospitals < 1 or args.rounds < 1:
            raise ConfigError("--hospitals and --rounds must be at least 1.")
        data_root = args.data_root or Path("demo-data")
        if args.data_root is None:
            prepare_demo_data(data_root, args.hospitals, args.seed)
        cfg = user_config_from_args(args, data_root)
        run_dir = simulate(cfg, args.hospitals, verbose=args.verbose,
                           default_policy=no_dp_policy() if args.no_dp else None)
    except (ConfigError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: the simulation failed: {err}", file=sys.stderr)
        return 1
    print()
    print(format_history(read_history(run_dir)[-1:]))  # the last round; every round was logged
    summary = read_summary(run_dir) or {"status": "unknown", "message": "", "sites": {}}
    print("\nPrivacy per site (cumulative over this run):")
    print(format_privacy(summary))
    print(f"\n{summary['message']} Finished in {time.perf_counter() - start:.0f} s. "
          f"Outputs in {run_dir}/ (history.jsonl, summary.json, plots *.png, round-NNN.safetensors, "
          f"model.safetensors + model.json). Report: fedfusion report {run_dir}")
    if summary["status"] != "completed":
        print(f"error: {summary['message']}", file=sys.stderr)
        return 1
    return 0
