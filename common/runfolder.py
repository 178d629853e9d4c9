"""The run folder `<output-dir>/<run-name>/`: its files, and typed records of what they hold.

The coordinator writes it (`server.recorder`), resumes from it (`server.resume`); the report, the
plots and the simulation command read it. Every file is replaced atomically.

| file | record |
|---|---|
| `run-config.json` | `RunSettings`: the run key and the run configuration used |
| `history.jsonl` | one `HistoryLine` per finished round (or the round that stopped the run) |
| `summary.json` | `Summary`: how the run ended, each site's privacy spend |
| `round-NNN.safetensors` | the global trainable parameters after round NNN |
| `round-NNN.server-optimizer.safetensors` | FedAdam/FedYogi moments after round NNN |
| `model.safetensors`, `model.json` | the final full model (`common.model.checkpoint`) |

JSON has no inf or nan: they are written as null (epsilon without DP, AUROC of a single class).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as R
from common.errors import ConfigurationError
from common.files import append_line_atomic, atomic_write_bytes

RUN_SETTINGS = "run-config.json"
HISTORY = "history.jsonl"
SUMMARY = "summary.json"
STATUS_COMPLETED, STATUS_STOPPED = "completed", "stopped"

Metrics = dict[str, float | int | None]  # a reply's metrics as recorded (non-finite: None)


class RunFolderError(ConfigurationError):
    """A run folder's file is missing or damaged; the message names it and what to do."""


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def recorded(metrics: Mapping[str, Any]) -> Metrics:
    """A reply's metrics as the history keeps them (JSON-safe: non-finite values become None)."""
    return {k: _finite(v) for k, v in metrics.items()}


@dataclass(frozen=True, kw_only=True)
class SiteRound:
    """One site's part of a round: what its train and evaluate replies reported."""

    node_id: int | None = None  # the Flower node the replies came from
    train: Metrics | None = None  # TRAIN_METRICS; num-examples = its training records
    evaluate: Metrics | None = None  # EVAL_METRICS; num-examples = its validation records
    update_sha256: str | None = None  # the coordinator's SHA-256 of the update it received

    def to_json(self) -> dict[str, Any]:
        """The site's entry of a history line."""
        return {
            "node": self.node_id,
            "train": self.train,
            "evaluate": self.evaluate,
            "update-sha256": self.update_sha256,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SiteRound:
        """Inverse of `to_json`."""
        return cls(
            node_id=d.get("node"),
            train=d.get("train"),
            evaluate=d.get("evaluate"),
            update_sha256=d.get("update-sha256"),
        )

    def metric(self, key: str) -> float | int | None:
        """A metric of the evaluate reply if it has it, else of the train reply."""
        for part in (self.evaluate, self.train):
            if part and key in part:
                return part[key]
        return None


@dataclass(frozen=True, kw_only=True)
class HistoryLine:
    """One round of `history.jsonl`.

    `aggregate`: the coordinator's weighted means over sites (train-loss by training records,
    validation metrics by validation records; privacy metrics are never averaged). A round that
    stopped the run has `stopped` (why) and no aggregate.
    """

    round: int
    sites: dict[str, SiteRound] = field(default_factory=dict)
    aggregate: Metrics | None = None
    stopped: str | None = None
    refusals: dict[str, str] = field(default_factory=dict)  # site: reason
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # updates the coordinator screened out
    capped: dict[str, str] = field(default_factory=dict)  # sites whose weight was capped
    # `weighted` fusion: the global model's learned weights {image, text} after the round
    modality_weights: dict[str, float] | None = None

    @property
    def finished(self) -> bool:
        """The round was aggregated (it did not stop the run)."""
        return self.stopped is None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the line."""
        line: dict[str, Any] = {
            "round": self.round,
            "sites": {n: s.to_json() for n, s in sorted(self.sites.items())},
        }
        line.update(
            {"stopped": self.stopped} if self.stopped is not None else {"aggregate": self.aggregate}
        )
        line.update(
            refusals=dict(sorted(self.refusals.items())),
            failures=dict(sorted(self.failures.items())),
            rejected=dict(sorted(self.rejected.items())),
            capped=dict(sorted(self.capped.items())),
        )
        if self.modality_weights is not None:
            line["modality-weights"] = dict(self.modality_weights)
        return line

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HistoryLine:
        """Inverse of `to_json`."""
        return cls(
            round=int(d["round"]),
            sites={n: SiteRound.from_json(s) for n, s in d.get("sites", {}).items()},
            aggregate=d.get("aggregate"),
            stopped=d.get("stopped"),
            refusals=dict(d.get("refusals", {})),
            failures=dict(d.get("failures", {})),
            rejected=dict(d.get("rejected", {})),
            capped=dict(d.get("capped", {})),
            modality_weights=(
                dict(d["modality-weights"]) if d.get("modality-weights") is not None else None
            ),
        )


@dataclass(frozen=True, kw_only=True)
class SiteSummary:
    """One site over the whole run: its last reported privacy spend and its rounds."""

    epsilon: float | None = None  # None: did not train, or trained without DP
    delta: float | None = None
    noise_multiplier: float | None = None
    steps: int = 0
    rounds_trained: list[int] = field(default_factory=list)
    rounds_refused: list[int] = field(default_factory=list)
    rounds_failed: list[int] = field(default_factory=list)
    rounds_rejected: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """`summary.json`: how the run ended and each site's privacy spend (never averaged)."""

    status: str  # STATUS_COMPLETED or STATUS_STOPPED
    message: str
    rounds_completed: int
    sites: dict[str, SiteSummary]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file."""
        return {
            "status": self.status,
            "message": self.message,
            "rounds_completed": self.rounds_completed,
            "sites": {n: asdict(s) for n, s in sorted(self.sites.items())},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Summary:
        """Inverse of `to_json`."""
        return cls(
            status=d["status"],
            message=d["message"],
            rounds_completed=d["rounds_completed"],
            sites={n: SiteSummary(**s) for n, s in d["sites"].items()},
        )

    @classmethod
    def of_history(cls, lines: list[HistoryLine], *, status: str, message: str) -> Summary:
        """The summary of a run's history lines."""
        sites: dict[str, dict[str, Any]] = {}

        def site(name: str) -> dict[str, Any]:
            return sites.setdefault(
                name,
                {
                    "rounds_trained": [],
                    "rounds_refused": [],
                    "rounds_failed": [],
                    "rounds_rejected": [],
                },
            )

        for line in lines:
            for name, s in line.sites.items():
                entry = site(name)
                if s.train is not None:
                    entry["rounds_trained"].append(line.round)
                    entry.update(
                        epsilon=s.train.get(R.EPSILON),
                        delta=s.train.get(R.DELTA),
                        noise_multiplier=s.train.get(R.NOISE_MULTIPLIER),
                        steps=int(s.train.get(R.STEPS) or 0),
                    )
            for kind, names in (
                ("rounds_refused", line.refusals),
                ("rounds_failed", line.failures),
                ("rounds_rejected", line.rejected),
            ):
                for name in names:
                    site(name)[kind].append(line.round)
        return cls(
            status=status,
            message=message,
            rounds_completed=sum(line.finished for line in lines),
            sites={n: SiteSummary(**s) for n, s in sites.items()},
        )


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """`run-config.json`: the run key the sites file their ledgers under, and the settings."""

    run_key: str
    settings: dict[str, dict[str, Any]]  # RunConfig section -> field -> value

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file."""
        return {"run_key": self.run_key, **self.settings}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunSettings:
        """Inverse of `to_json`."""
        d = dict(d)
        return cls(run_key=str(d.pop("run_key")), settings=d)


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder; reading and writing them is this class' job alone."""

    path: Path

    @property
    def name(self) -> str:
        """The run's name (the folder's)."""
        return self.path.name

    def round_checkpoint(self, server_round: int) -> Path:
        """Where the global trainable state after `server_round` is saved."""
        return self.path / f"round-{server_round:03d}.safetensors"

    def optimizer_checkpoint(self, server_round: int) -> Path:
        """Where the server optimiser's state after `server_round` is saved (FedAdam, FedYogi)."""
        return self.path / f"round-{server_round:03d}.server-optimizer.safetensors"

    def is_empty(self) -> bool:
        """No folder yet, or an empty one: a new run."""
        return not self.path.exists() or not any(self.path.iterdir())

    def read_settings(self) -> RunSettings | None:
        """`run-config.json`, if the folder has one."""
        data = self._read_json(RUN_SETTINGS)
        return RunSettings.from_json(data) if data is not None else None

    def write_settings(self, settings: RunSettings) -> None:
        """Write `run-config.json`."""
        self._write_json(RUN_SETTINGS, settings.to_json())

    def read_history(self) -> list[HistoryLine]:
        """Every line of `history.jsonl` (none if the file is absent)."""
        path = self.path / HISTORY
        if not path.is_file():
            return []
        lines = []
        for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.strip():
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as err:
                    raise RunFolderError(
                        f"{path}:{i} is not valid JSON ({err.msg}); the history is damaged."
                    ) from err
                try:
                    lines.append(HistoryLine.from_json(data))
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    raise RunFolderError(
                        f"{path}:{i} is not a history line ({err!r}); the run folder is damaged."
                    ) from err
        return lines

    def append_history(self, line: HistoryLine) -> None:
        """Append a round to `history.jsonl` (the round's commit: it is finished once written)."""
        append_line_atomic(self.path / HISTORY, json.dumps(line.to_json()))

    def rewrite_history(self, lines: list[HistoryLine]) -> None:
        """Replace `history.jsonl` by `lines` (resume drops unfinished rounds)."""
        text = "".join(json.dumps(line.to_json()) + "\n" for line in lines)
        atomic_write_bytes(self.path / HISTORY, text.encode())

    def read_summary(self) -> Summary | None:
        """`summary.json`, if the run got that far."""
        data = self._read_json(SUMMARY)
        return Summary.from_json(data) if data is not None else None

    def write_summary(self, summary: Summary) -> None:
        """Write `summary.json`."""
        self._write_json(SUMMARY, summary.to_json())

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunFolderError(
                f"{path} is not valid JSON ({err}); the run folder is damaged."
            ) from err

    def _write_json(self, name: str, data: Any) -> None:
        atomic_write_bytes(self.path / name, json.dumps(data, indent=2).encode())
