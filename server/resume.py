"""Where a run starts: a new run folder, or after the last finished round of an interrupted run.

The run folder is the run's state (`common.runfolder`). `run-config.json` holds the run's
settings and its run key (the name sites file their privacy ledger under, stable across server
restarts). A round is finished when its line is in `history.jsonl`; that line is written after the
round's checkpoint, and every file is replaced atomically, so a crash at any point leaves the last
finished round usable. Starting the ServerApp again with the same run name continues after the
last finished round with its global parameters and history. The settings must be the same; only
`round-timeout`, `min-nodes`, `output-dir` and `site-nodes` (a hospital registered again has a
new node id) may change on resume.
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

from common.config import RunConfig
from common.errors import ConfigurationError
from common.model.checkpoint import load_tensors
from common.runfolder import STATUS_COMPLETED, HistoryLine, RunFolder, RunSettings

log = logging.getLogger(__name__)

# Settings that may differ when a run is resumed: they do not change what a round computes.
RESUMABLE_CHANGES = {
    ("federation", "round_timeout"),
    ("federation", "min_nodes"),
    ("federation", "output_dir"),
    ("federation", "site_nodes"),
}


class ResumeError(ConfigurationError):
    """The run folder holds a run that cannot be continued with these settings."""


@dataclass(frozen=True, kw_only=True)
class RunStart:
    """Where a run starts: a new folder, or after the last finished round of an earlier start."""

    folder: RunFolder
    run_key: str
    finished_round: int = 0  # 0: a new run
    arrays: dict[str, np.ndarray] | None = None  # global trainable state after finished_round
    lines: list[HistoryLine] = field(default_factory=list)  # history of the finished rounds
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)


def settings_of(run: RunConfig) -> dict[str, dict[str, Any]]:
    """The run config as written to run-config.json."""
    return {
        "federation": vars(run.federation),
        "aggregation": vars(run.aggregation),
        "data": vars(run.data),
        "model": run.model.to_json_dict(),
        "train": vars(run.train),
        "privacy": vars(run.privacy),
    }


def run_folder(run: RunConfig) -> RunFolder:
    """`<output-dir>/<run-name>` (a time-stamped name when run-name is empty)."""
    name = run.federation.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    return RunFolder(Path(run.federation.output_dir).expanduser().resolve() / name)


def check_run_folder(run: RunConfig) -> int:
    """Rounds already finished in the run folder (0 for a new run); ResumeError if it cannot go on.

    Writes nothing: commands call it before starting a federation to fail fast.
    """
    folder = run_folder(run)
    return 0 if folder.is_empty() else len(_inspect(folder, run)[1])


def open_run(run: RunConfig) -> RunStart:
    """Create the run folder, or find where an interrupted run with the same name stopped."""
    folder = run_folder(run)
    if folder.is_empty():
        folder.path.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(16)
        folder.write_settings(RunSettings(run_key=key, settings=settings_of(run)))
        return RunStart(folder=folder, run_key=key)
    saved, finished, lines = _inspect(folder, run)
    if len(finished) != len(lines):
        dropped = [line.round for line in lines[len(finished) :]]
        log.warning(
            "resume: round(s) %s of %s were not finished and will be run again",
            dropped,
            folder.name,
        )
        folder.rewrite_history(finished)
    last = len(finished)
    arrays, optimizer = None, {}
    if last:
        arrays = {k: v.numpy() for k, v in load_tensors(folder.round_checkpoint(last)).items()}
        if folder.optimizer_checkpoint(last).is_file():
            optimizer = {
                k: v.numpy() for k, v in load_tensors(folder.optimizer_checkpoint(last)).items()
            }
    log.info(
        "resuming run %s after round %d of %d", folder.name, last, run.federation.num_server_rounds
    )
    return RunStart(
        folder=folder,
        run_key=saved.run_key,
        finished_round=last,
        arrays=arrays,
        lines=finished,
        optimizer_state=optimizer,
    )


def _inspect(
    folder: RunFolder, run: RunConfig
) -> tuple[RunSettings, list[HistoryLine], list[HistoryLine]]:
    """(saved settings, finished rounds' history lines, all history lines) of a run to resume."""
    saved = folder.read_settings()
    if saved is None:
        raise ResumeError(
            f"{folder.path} is not empty and holds no run-config.json, so it is not a "
            "FedFusion run. Choose another run-name or output-dir."
        )
    differences = _differences(saved.settings, settings_of(run))
    if differences:
        raise ResumeError(
            f"Run folder {folder.path} holds a run with other settings ({'; '.join(differences)}). "
            "To resume it, use its settings (they are in run-config.json); to start a new run, "
            "choose another run-name."
        )
    summary = folder.read_summary()
    if summary and summary.status == STATUS_COMPLETED:
        raise ResumeError(
            f"Run {folder.name} already completed all its rounds ({folder.path}). "
            "Choose another run-name for a new run."
        )
    lines = folder.read_history()
    finished: list[HistoryLine] = []
    for line in lines:  # rounds 1..k, each with its checkpoint; anything after is redone
        if (
            not line.finished
            or line.round != len(finished) + 1
            or not folder.round_checkpoint(line.round).is_file()
        ):
            break
        finished.append(line)
    return saved, finished, lines


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved then, now' for every setting that may not change on resume."""
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
