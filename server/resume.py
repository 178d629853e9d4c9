"""A run's folder: start a new run, or resume one that a crash (or too few sites) interrupted.

The run folder `<output-dir>/<run-name>/` is the run's state. `run-config.json` holds the run's
settings and its run key (the name sites file their privacy ledger under, stable across server
restarts). A round is finished when its line is in `history.jsonl`; that line is written after the
round's checkpoint (`round-NNN.safetensors`, and the server optimiser's state for FedAdam/FedYogi),
and every file is replaced atomically, so a crash at any point leaves the last finished round
usable. Starting the ServerApp again with the same run name continues after the last finished round
with its global parameters and history. The settings must be the same; only `round-timeout` and
`min-nodes` may change on resume.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import load_tensors
from common.config import RunConfig
from common.files import atomic_write_bytes
from server.history import HISTORY, optimizer_checkpoint, read_history, read_summary, round_checkpoint

log = logging.getLogger(__name__)

RUN_CONFIG = "run-config.json"
RUN_KEY = "run-key"
# Settings that may differ when a run is resumed: they do not change what a round computes.
RESUMABLE_CHANGES = {("federation", "round_timeout"), ("federation", "min_nodes"),
                     ("federation", "output_dir")}


class ResumeError(RuntimeError):
    """The run folder holds a run that cannot be continued with these settings."""


@dataclass(frozen=True)
class RunStart:
    """Where a run starts: a new folder, or after the last finished round of an earlier start."""

    out_dir: Path
    run_key: str
    finished_round: int = 0  # 0: a new run
    arrays: dict[str, np.ndarray] | None = None  # global trainable state after finished_round
    lines: list[dict[str, Any]] = field(default_factory=list)  # history of the finished rounds
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)


def settings_json(run: RunConfig) -> dict[str, Any]:
    """The run config as written to run-config.json."""
    return {"federation": vars(run.federation), "aggregation": vars(run.aggregation),
            "data": vars(run.data), "model": run.model.to_json_dict(), "train": vars(run.train),
            "privacy": vars(run.privacy)}


def run_folder(run: RunConfig) -> Path:
    """`<output-dir>/<run-name>` (a time-stamped name when run-name is empty)."""
    name = run.federation.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    return Path(run.federation.output_dir).expanduser().resolve() / name


def check_run_folder(run: RunConfig) -> int:
    """Rounds already finished in the run's folder (0 for a new run); ResumeError if it cannot go on.

    Writes nothing: commands call it before starting a federation to fail fast.
    """
    folder = run_folder(run)
    if not folder.exists() or not any(folder.iterdir()):
        return 0
    _, finished, _ = _inspect(folder, run)
    return len(finished)


def open_run(run: RunConfig) -> RunStart:
    """Create the run folder, or find where an interrupted run with the same name stopped."""
    folder = run_folder(run)
    if not folder.exists() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(16)
        atomic_write_bytes(folder / RUN_CONFIG, json.dumps(
            {RUN_KEY: key, **settings_json(run)}, indent=2).encode())
        return RunStart(folder, key)
    saved, finished, lines = _inspect(folder, run)
    if len(finished) != len(lines):
        dropped = [line["round"] for line in lines[len(finished):]]
        log.warning("resume: round(s) %s of %s were not finished and will be run again", dropped,
                    folder.name)
        atomic_write_bytes(folder / HISTORY, "".join(json.dumps(x) + "\n" for x in finished).encode())
    last = len(finished)
    arrays = optimizer = None
    if last:
        arrays = {k: v.numpy() for k, v in load_tensors(round_checkpoint(folder, last)).items()}
        opt_file = optimizer_checkpoint(folder, last)
        if opt_file.is_file():
            optimizer = {k: v.numpy() for k, v in load_tensors(opt_file).items()}
    log.info("resuming run %s after round %d of %d", folder.name, last,
             run.federation.num_server_rounds)
    return RunStart(folder, str(saved[RUN_KEY]), last, arrays, finished, optimizer or {})


def _inspect(folder: Path, run: RunConfig) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                     list[dict[str, Any]]]:
    """(saved settings, finished rounds' history lines, all history lines) of a run to resume."""
    config_file = folder / RUN_CONFIG
    if not config_file.is_file():
        raise ResumeError(f"{folder} is not empty and holds no {RUN_CONFIG}, so it is not a FedFusion "
                          "run. Choose another run-name or output-dir.")
    saved = json.loads(config_file.read_text())
    differences = _differences(saved, settings_json(run))
    if differences:
        raise ResumeError(
            f"Run folder {folder} holds a run with other settings ({'; '.join(differences)}). To "
            "resume it, use its settings (they are in run-config.json); to start a new run, choose "
            "another run-name.")
    summary = read_summary(folder)
    if summary and summary.get("status") == "completed":
        raise ResumeError(f"Run {folder.name} already completed all its rounds ({folder}). Choose "
                          "another run-name for a new run.")
    lines = read_history(folder)
    finished: list[dict[str, Any]] = []
    for line in lines:  # rounds 1..k, each with its checkpoint; anything after is redone
        if ("stopped" in line or line["round"] != len(finished) + 1
                or not round_checkpoint(folder, line["round"]).is_file()):
            break
        finished.append(line)
    return saved, finished, lines


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.key: saved -> now' for every setting that may not change on resume."""
    out = []
    for section, values in current.items():
        old = saved.get(section, {})
        for key, value in values.items():
            if (section, key) in RESUMABLE_CHANGES:
                continue
            before = old.get(key, "<absent>")
            if json.loads(json.dumps(value)) != before:
                out.append(f"{key.replace('_', '-')}: {before!r} then, {value!r} now")
    return out
