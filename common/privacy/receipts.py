"""A site's privacy receipts: one line per charge, in `receipts.jsonl` of its state folder.

A receipt says what a round's training (`kind` "train") or a release (`kind` "evaluate": the
noisy evaluation counts; "train-loss": a noisy training loss) spent, and carries the SHA-256 of
exactly what left the site (the update, or the released values; the coordinator's history
records the hash of the update it received, so both sides can be matched). `fedfusion privacy
report` re-derives every epsilon from the receipts alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import append_line_atomic
from common.privacy.ledger import guarded_write

RECEIPTS_FILE = "receipts.jsonl"
TRAIN, EVALUATE, TRAIN_LOSS = "train", "evaluate", "train-loss"
KINDS = (TRAIN, EVALUATE, TRAIN_LOSS)


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """One round's privacy receipt: what was spent and what left the site."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps in this round
    accountant: str
    epsilon: float | None  # cumulative over this run after this round (None: trained without DP)
    delta: float | None
    scope_epsilon: float | None  # cumulative over the policy's budget scope (run or dataset)
    budget_scope: str
    update_sha256: str
    dataset_sha256: str
    time: str
    kind: str = TRAIN  # what was charged: a round's training, or a release (KINDS)
    # a secure-aggregation round (0: none): the sites its masked vector was summed with, the
    # honest noise shares its epsilon assumes, the colluders its policy assumes, and the run's
    # epsilon over the budget scope if every other site colluded (its own noise share alone)
    cohort: int = 0
    noise_shares: int = 0
    colluders: int = 0
    fallback_epsilon: float | None = None

    @staticmethod
    def now() -> str:
        """UTC time stamp for a receipt."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_receipt(state_dir: Path, receipt: Receipt) -> None:
    """Append one receipt line (atomically: the file is never left half-written)."""
    guarded_write(
        lambda: append_line_atomic(
            state_dir / RECEIPTS_FILE, json.dumps(asdict(receipt)), durable=True
        ),
        state_dir,
    )


def read_receipts(state_dir: Path) -> list[Receipt]:
    """All receipts of a state directory, in the order they were written."""
    path = state_dir / RECEIPTS_FILE
    if not path.exists():
        return []
    return [Receipt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
