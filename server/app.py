"""The coordinator's Flower ServerApp: open (or resume) the run folder, run rounds, write the model.

It builds the model from the run config (the initial trainable parameters and the frozen part's
fingerprint), runs the round loop (`server.loop`) over Flower's strategy (`server.strategy`) on
the nodes the run binds (`server.sites`: `site-nodes`, else their registered names), and
leaves the run folder `<output-dir>/<run-name>/` (`common.runfolder`): a checkpoint and a history
line per round, `summary.json`, and the final full model (`model.safetensors` + `model.json`,
loadable with `common.model.checkpoint.load_model`). When fewer than `min-nodes` sites send a
usable update in a round, the run ends cleanly there with the last global model, and then fails
(`RunStopped`) so that Flower records it as `finished:failed` and `fedfusion run` exits non-zero.

The ServerApp process' output is what `flwr run --stream` and `flwr log` show, so `main` sends
FedFusion's INFO lines there: each round's table, and at the end the run folder and its status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.model.checkpoint import save_model
from common.model.fusion_model import build_model
from common.model.trainable import (
    frozen_fingerprint,
    load_trainable_state,
    trainable_state,
)
from common.runfolder import STATUS_COMPLETED, STATUS_STOPPED
from server.loop import RoundPlan, run_rounds
from server.recorder import Recorder
from server.resume import open_run
from server.screening import UpdateBounds
from server.secure import SecurePlan
from server.sites import SiteGrid
from server.strategy import build_strategy, load_optimizer_state

log = logging.getLogger(__name__)

# FedFusion's loggers whose INFO lines the coordinator reads in the run's log
_LOGGERS = ("server", "common")
_HANDLER_NAME = "fedfusion-serverapp"

app = ServerApp()


class RunStopped(RuntimeError):
    """A run that ended before its last round; raised after its outputs are written."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point that Flower calls with the run config of `[tool.flwr.app.config]`."""
    log_to_run_output()
    end = federate(grid, RunConfig.from_user_config(context.run_config))
    if end.stopped:  # an exception is Flower's only way to mark the run failed
        raise RunStopped(
            f"The run stopped early: {end.stopped.splitlines()[0].rstrip('.')}. Its run folder "
            f"{end.folder} holds the rounds that finished (summary.json: stopped); fix the cause "
            "and submit the same run again (same run-name) to resume after the last finished round."
        )


def log_to_run_output() -> None:
    """Send FedFusion's INFO lines to this process' stderr, which Flower forwards to `flwr log`."""
    handler = logging.StreamHandler()  # sys.stderr now: the ServerApp process' mirrored output
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):  # once per process
            logger.addHandler(handler)


@dataclass(frozen=True, kw_only=True)
class RunEnd:
    """How a run ended: its folder, the final global trainable parameters, why it stopped early."""

    folder: Path
    arrays: ArrayRecord
    stopped: str | None = None  # None: every planned round finished


def run_federation(grid: Grid, run: RunConfig) -> Path:
    """Run (or resume) all rounds and write the outputs; return the run folder."""
    return federate(grid, run).folder


def federate(grid: Grid, run: RunConfig) -> RunEnd:
    """The ServerApp's run on `grid`: open or resume the run folder, run rounds, write the model."""
    model = build_model(run.model)  # first: a bad encoder path fails before anything is written
    fingerprint = frozen_fingerprint(model)
    start = open_run(run)
    fed, agg = run.federation, run.aggregation
    log.info(
        "run folder %s; frozen-part fingerprint %s; strategy %s",
        start.folder.path,
        fingerprint[:16],
        agg.strategy,
    )
    strategy = build_strategy(fed, agg)
    recorder = Recorder(start.folder, start.lines)
    plan = round_plan(run, run_key=start.run_key, fingerprint=fingerprint)
    arrays = ArrayRecord(trainable_state(model))
    if start.arrays is not None:  # in the model's order, not the checkpoint's (sorted): a site
        # recognises a round asked again by the digest of the parameters in the order they came
        arrays = ArrayRecord({k: Array(start.arrays[k]) for k in arrays})
        load_optimizer_state(strategy, start.optimizer_state, arrays)
    end = run_rounds(
        SiteGrid.bind(grid, fed.site_map),
        strategy,
        recorder,
        plan,
        first_round=start.finished_round + 1,
        arrays=arrays,
    )
    status, message = STATUS_COMPLETED, f"All {fed.num_server_rounds} rounds completed."
    if end.stopped:
        status, message = STATUS_STOPPED, f"The run stopped early. {end.stopped}"
        log.warning("%s", message)
    load_trainable_state(model, dict(end.arrays.to_torch_state_dict()))
    save_model(start.folder.path, model)
    recorder.finish(status=status, message=message)
    log.info("run %s; run folder %s: %s", status, start.folder.path, message)
    return RunEnd(folder=start.folder.path, arrays=end.arrays, stopped=end.stopped)


def round_plan(run: RunConfig, *, run_key: str, fingerprint: str) -> RoundPlan:
    """What every round of `run` does: its timeout, min-nodes, update bounds and weight cap."""
    fed, agg = run.federation, run.aggregation
    return RoundPlan(
        last_round=fed.num_server_rounds,
        timeout=fed.round_timeout,
        min_nodes=fed.min_nodes,
        run_key=run_key,
        fingerprint=fingerprint,
        bounds=UpdateBounds(max_norm=agg.max_update_norm, median_factor=agg.update_norm_factor),
        weight_factor=agg.max_weight_factor,
        num_classes=len(run.model.class_names),
        fields=bool(run.model.tabular),
        secure=SecurePlan(
            colluders=run.privacy.secagg_colluders,
            max_grad_norm=run.privacy.max_grad_norm,
            learning_rate=run.train.learning_rate,
            momentum=run.train.momentum,
        )
        if run.privacy.secure_aggregation
        else None,
    )
