"""The coordinator: a Flower ServerApp running FedAvg rounds over the hospitals.

It builds the model from the run config (to get the initial trainable parameters and the
frozen part's fingerprint), runs the strategy, and leaves under `<output-dir>/<run-name>/`:
`round-NNN.safetensors` after every round, `history.jsonl`, `run-config.json`, `summary.json`
(how the run ended, each site's privacy spend), and the final full model (`model.safetensors` +
`model.json`, loadable with `common.checkpoint.load_model`). When fewer than `min-nodes` sites
train in a round (refusals or failures), the run ends cleanly there with the last global model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import records as R
from common.checkpoint import save_model
from common.files import atomic_write_bytes
from common.config import RunConfig
from common.model import build_model, frozen_fingerprint, load_trainable_state, trainable_state
from server.history import RunRecorder
from server.strategy import NotEnoughSites, RecordingFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


def output_folder(run: RunConfig) -> Path:
    """`<output-dir>/<run-name>`, created empty; an existing non-empty folder is an error."""
    name = run.federation.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    folder = Path(run.federation.output_dir).expanduser().resolve() / name
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(
            f"Run folder {folder} already holds a run. Choose another run-name or remove it.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def round_config(run: RunConfig, fingerprint: str) -> ConfigRecord:
    """What every site is told each round (Flower adds the round number)."""
    return ConfigRecord({
        R.NUM_ROUNDS: run.federation.num_server_rounds,
        R.LEARNING_RATE: run.train.learning_rate,
        R.FROZEN_FINGERPRINT: fingerprint,
        R.DP: run.privacy.dp,
        R.TARGET_EPSILON: run.privacy.target_epsilon,
        R.TARGET_DELTA: run.privacy.target_delta,
    })


def run_federation(grid: Grid, run: RunConfig) -> Path:
    """Run all rounds and write the outputs; return the run folder."""
    model = build_model(run.model)  # first: a bad encoder path fails before anything is written
    fingerprint = frozen_fingerprint(model)
    out_dir = output_folder(run)
    atomic_write_bytes(out_dir / "run-config.json", json.dumps(
        {"federation": vars(run.federation), "data": vars(run.data),
         "model": run.model.to_json_dict(), "train": vars(run.train),
         "privacy": vars(run.privacy)}, indent=2).encode())
    log.info("run folder %s; frozen-part fingerprint %s", out_dir, fingerprint[:16])
    initial = ArrayRecord(trainable_state(model))
    recorder = RunRecorder(out_dir, initial)
    fed = run.federation
    strategy = RecordingFedAvg(
        recorder,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_nodes,
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=fed.num_server_rounds,
            timeout=fed.round_timeout,
            train_config=round_config(run, fingerprint),
            evaluate_config=ConfigRecord({R.FROZEN_FINGERPRINT: fingerprint}),
            evaluate_fn=recorder.end_of_round,
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
