"""The coordinator: a Flower ServerApp running federated rounds over the hospitals.

It builds the model from the run config (to get the initial trainable parameters and the
frozen part's fingerprint), runs the strategy (server.strategy), and leaves under
`<output-dir>/<run-name>/` (server.resume: a run interrupted by a crash continues there):
`round-NNN.safetensors` after every round, `history.jsonl`, `run-config.json`, `summary.json`
(how the run ended, each site's privacy spend), and the final full model (`model.safetensors` +
`model.json`, loadable with `common.checkpoint.load_model`). When fewer than `min-nodes` sites
train in a round (refusals or failures), the run ends cleanly there with the last global model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import records as R
from common.checkpoint import save_model
from common.config import RunConfig
from common.model import build_model, frozen_fingerprint, load_trainable_state, trainable_state
from server.history import RunRecorder
from server.resume import open_run
from server.strategy import NotEnoughSites, build_strategy

log = logging.getLogger(__name__)

app = ServerApp()


def round_config(run: RunConfig, fingerprint: str, run_key: str) -> ConfigRecord:
    """What every site is told each round (Flower adds the round number)."""
    return ConfigRecord({
        R.RUN_KEY: run_key,
        R.NUM_ROUNDS: run.federation.num_server_rounds,
        R.LEARNING_RATE: run.train.learning_rate,
        R.FROZEN_FINGERPRINT: fingerprint,
        R.DP: run.privacy.dp,
        R.TARGET_EPSILON: run.privacy.target_epsilon,
        R.TARGET_DELTA: run.privacy.target_delta,
    })


def run_federation(grid: Grid, run: RunConfig) -> Path:
    """Run (or resume) all rounds and write the outputs; return the run folder."""
    model = build_model(run.model)  # first: a bad encoder path fails before anything is written
    fingerprint = frozen_fingerprint(model)
    start = open_run(run)
    out_dir, fed = start.out_dir, run.federation
    log.info("run folder %s; frozen-part fingerprint %s; strategy %s", out_dir, fingerprint[:16],
             run.aggregation.strategy)
    initial = ArrayRecord(trainable_state(model))
    if start.arrays is not None:
        initial = ArrayRecord({k: Array(v) for k, v in start.arrays.items()})
    recorder = RunRecorder(out_dir, initial, start.lines)
    strategy = build_strategy(fed, run.aggregation, recorder, round_offset=start.finished_round)
    strategy.load_optimizer_state(start.optimizer_state)
    recorder.optimizer_state = strategy.optimizer_state
    remaining = fed.num_server_rounds - start.finished_round

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0:  # Flower also calls this before the first round
            recorder.end_of_round(server_round + start.finished_round, arrays)

    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=round_config(run, fingerprint, start.run_key),
            evaluate_config=ConfigRecord({R.FROZEN_FINGERPRINT: fingerprint}),
            evaluate_fn=end_of_round,
        )
        status, message = "completed", f"All {fed.num_server_rounds} rounds completed."
    except NotEnoughSites as stop:
        recorder.stop(stop.server_round, str(stop))
        status, message = "stopped", f"The run stopped early. {stop}"
        log.warning("%s", message)
    load_trainable_state(model, dict(recorder.last_arrays.to_torch_state_dict()))
    save_model(out_dir, model)
    recorder.write_summary(status, message)
    log.info("final model written to %s", out_dir)
    return out_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point that Flower calls with the run config of `[tool.flwr.app.config]`."""
    run_federation(grid, RunConfig.from_user_config(context.run_config))
