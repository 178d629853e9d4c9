"""A site's last sent update per run, so that a round asked again is answered without retraining.

When the server crashes after a site trained round r but before the round was finished, the
resumed server asks for round r again, from the same global parameters. Training again would spend
privacy a second time for one round. Instead the site sends the exact update it already sent, and
that its ledger already charged: the same bytes, so nothing new is released. A round asked again
from other global parameters is trained and charged like any round.

Kept in `<state-dir>/sent/`, one safetensors file per run (the latest round only), written after
the ledger and the receipt and before the reply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from common.files import atomic_write_bytes
from common.training.loop import TrainResult

SENT_FOLDER = "sent"


@dataclass(frozen=True, kw_only=True)
class SentUpdate:
    """What a site sent for one round, and the global parameters it started from."""

    server_round: int
    global_sha256: str  # common.protocol.update_digest of the global parameters received
    state: dict[str, torch.Tensor]
    result: TrainResult


def _path(state_dir: Path, run_id: str) -> Path:
    return (
        state_dir / SENT_FOLDER / f"{hashlib.sha256(run_id.encode()).hexdigest()[:24]}.safetensors"
    )


def save_sent(state_dir: Path, run_id: str, sent: SentUpdate) -> None:
    """Keep `sent` as the run's latest sent update (atomically)."""
    meta = {
        "run_id": run_id,
        "server_round": str(sent.server_round),
        "global_sha256": sent.global_sha256,
        "result": json.dumps(asdict(sent.result)),
        "order": json.dumps(list(sent.state)),
    }  # safetensors sorts names; the hash needs the order
    data = save({k: v.detach().cpu().contiguous() for k, v in sent.state.items()}, metadata=meta)
    atomic_write_bytes(_path(state_dir, run_id), data, durable=True)


def load_sent(state_dir: Path, run_id: str) -> SentUpdate | None:
    """The run's latest sent update, or None if the site kept none."""
    path = _path(state_dir, run_id)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        if meta.get("run_id") != run_id:
            return None
        state = {k: fh.get_tensor(k) for k in json.loads(meta["order"])}
    return SentUpdate(
        server_round=int(meta["server_round"]),
        global_sha256=meta["global_sha256"],
        state=state,
        result=TrainResult(**json.loads(meta["result"])),
    )
