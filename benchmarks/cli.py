"""The benchmark runner: pick benchmarks, run each, print the table, write the JSON files."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.record import RESULTS_DIR, Outcome, machine, meets, write_outcome
from simulations.cli import quiet_flower

log = logging.getLogger(__name__)

# name -> summary key; each name is a module of this package with `run(quick, work) -> Outcome`
# (in run order: the short timings first, before Ray's processes have run on the machine)
BENCHMARKS: dict[str, str] = {
    "aggregation": "aggregation_vs_numpy_ratio",
    "traffic": "upload_reduction_ratio",
    "dp_overhead": "dp_overhead_ratio",
    "feature_cache": "feature_cache_speedup",
    "utility": "auroc_gap_fed_dp8_vs_central",
    "small_hospitals": "medpix_auroc_fed_dp8",
    "dp_recipe": "dp_recipe_best_gain_demo_small",
    "secagg_utility": "secagg_auroc_fed_ddp8_demo_small",
    "trainable_sets": "lora_gain_fed_dp8",
    "framework_overhead": "framework_overhead_fraction",
    "scale": "max_hospitals_simulated",
    "deployment": "deployment_round_ratio",
    "secagg_overhead": "secagg_round_overhead_ratio",
    "membership": "mia_auc_dp8",
    "side_channels": "side_channel_advantage",
    "tabular_fields": "medpix_auroc_fed_dp8_three_modalities",
}
# summary.json keys, in order; utility also reports the gain over local-only training,
# small_hospitals its reference (the linear probe) and the other targets per dataset
SMALL_HOSPITAL_KEYS = tuple(
    f"{data}_{key}"
    for data in ("medpix", "demo_small")
    for key in ("auroc_fed_dp8", "auroc_probe", "gain_fed_dp8_vs_single_dp8", "gap_central_vs_fed")
)
SUMMARY_KEYS = (
    "dp_overhead_ratio",
    "upload_reduction_ratio",
    "feature_cache_speedup",
    "framework_overhead_fraction",
    "auroc_gap_fed_dp8_vs_central",
    "auroc_gain_fed_vs_local",
    "max_hospitals_simulated",
    "aggregation_vs_numpy_ratio",
    "deployment_round_ratio",
    "deployment_round_overhead_s",
    "flower_floor_round_overhead_s",
    "mia_auc_dp8",
    "mia_auc_nodp",
    "mia_tpr_at_1pct_fpr_dp8",
    "mia_tpr_at_1pct_fpr_nodp",
    *SMALL_HOSPITAL_KEYS,
    "lora_gain_fed_dp8",
    "dp_recipe_best_gain_demo_small",
    "dp_recipe_rule_gain_demo_small",
    "dp_recipe_rule_gain_medpix",
    "secagg_auroc_fed_ddp8_demo_small",
    "secagg_auroc_central_dp8_demo_small",
    "secagg_auroc_fed_ddp8_medpix",
    "secagg_auroc_central_dp8_medpix",
    "secagg_auroc_fed_ddp8_loop_demo_small",
    "secagg_auroc_fed_ddp8_loop_medpix",
    "side_channel_advantage",
    "eval_attack_advantage",
    "dp_eval_auroc_mae",
    "secagg_round_overhead_ratio",
    "secagg_round_time_ratio_default",
    "medpix_auroc_fed_dp8_three_modalities",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The runner's options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Measure FedFusion's cost and utility; print a table and write "
        "<out>/summary.json plus one JSON per benchmark.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller data and fewer repeats: under 10 minutes on 2 CPU cores",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        default=None,
        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)}); "
        "the summary keeps earlier results of the others; None: all",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for generated data and runs; None: a temporary folder, removed after",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (a simulated hospital gets one core; on a busy "
        "machine more threads slow the small ops of a cached epoch tenfold)",
    )
    parser.add_argument("--verbose", action="store_true", help="log progress at INFO level")
    return parser.parse_args(argv)


def run_one(name: str, quick: bool, work: Path) -> tuple[Outcome, float]:
    """Run one benchmark module in its own work folder; return its outcome and wall time."""
    module = importlib.import_module(f"benchmarks.{name}")
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcome = module.run(quick=quick, work=folder)
    return outcome, time.perf_counter() - start


def summary(out_dir: Path) -> dict[str, float | None]:
    """summary.json: every key, from the latest result of each benchmark (None if never run)."""
    values: dict[str, float | None] = dict.fromkeys(SUMMARY_KEYS)
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            values[doc["key"]] = doc["value"]
            values.update({k: v[0] for k, v in doc.get("extra", {}).items() if k in values})
    return values


def table(rows: list[tuple[str, Outcome, float]]) -> str:
    """The printed table: one line per benchmark."""
    lines = [f"{'benchmark':<19}{'key':<31}{'value':>9}  {'target':<8}{'met':<5}{'time s':>7}"]
    for name, o, seconds in rows:
        lines.append(
            f"{name:<19}{o.key:<31}{o.value:>9.3f}  {o.target:<8}{'yes' if o.met else 'NO':<5}"
            f"{seconds:>7.0f}"
        )
        for key, (value, target) in o.extra.items():
            met = "yes" if meets(value, target) else "NO"
            lines.append(f"{'':<19}{key:<31}{value:>9.3f}  {target:<8}{met:<5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks; exit 0 when all ran (targets missed are reported, not failed)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    quiet_flower(verbose=args.verbose)  # before any benchmark imports flwr
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}.")
    torch.set_num_threads(args.threads)
    # torch warns on every DP step that Opacus hooks a first trainable layer whose inputs need no
    # gradient: harmless (pyproject's pytest settings ignore it too)
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing when gradients are computed"
    )
    names = args.only or list(BENCHMARKS)
    started, load_before = time.perf_counter(), machine()["load_average"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfusion-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        for name in names:
            print(f"running {name} ...", flush=True)
            outcome, seconds = run_one(name, args.quick, work)
            write_outcome(name, outcome, seconds, args.quick, args.out)
            rows.append((name, outcome, seconds))
    values = summary(args.out)
    (args.out / "summary.json").write_text(json.dumps(values, indent=2) + "\n")
    total = time.perf_counter() - started
    print()
    print(table(rows))
    print(
        f"\n{len(rows)} benchmark(s) in {total:.0f} s ({'quick' if args.quick else 'full'}); "
        f"load average before {load_before}, after {machine()['load_average']}; "
        f"results in {args.out}/"
    )
    return 0
