"""One base for the errors FedFusion raises on purpose, each with a kind the other side can act on.

A site's reply to a failed round says which kind of problem stopped it (a distinct Flower error
code per kind, `protocol.ERROR_CODES`), so the coordinator tells a privacy refusal from bad data
or a misconfiguration without parsing text. Any exception that is not a `FedFusionError` is a
defect in FedFusion itself: it is reported as kind `bug`, never dressed up as a data problem.

Every error has a `detail` (what is wrong, why, how to fix it; it may name files and rows, so it
stays in the site's own log) and a `reason`: one word of a fixed vocabulary (`REASONS`) that is
all the other side learns.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Kind(StrEnum):
    """What kind of problem stopped the work."""

    REFUSAL = "refusal"  # the site's privacy policy forbids it: nothing trained, nothing charged
    BAD_DATA = "bad-data"  # the site's data cannot be used as it is
    CONFIGURATION = "configuration"  # a setting is wrong: run or node config, policy, model source
    FAILURE = "failure"  # the work could not be done (state folder, disk, device)
    BUG = "bug"  # an unexpected exception: a defect in FedFusion


# The fixed vocabulary of reasons a reply may carry, per kind (issue: nothing else leaves a site).
REASONS: dict[Kind, tuple[str, ...]] = {
    Kind.REFUSAL: ("dp-required", "epsilon-cap", "max-rounds", "budget-exhausted",
                   "metrics-withheld", "run-key-conflict", "data-changed", "bundle-not-accepted",
                   "too-few-records", "state-incomplete"),
    Kind.BAD_DATA: ("data-unusable", "no-training-rows"),
    Kind.CONFIGURATION: ("run-config", "node-config", "policy", "model-mismatch", "model-source",
                         "message"),
    Kind.FAILURE: ("state-folder", "device", "interrupted"),
    Kind.BUG: ("internal-error",),
}


class FedFusionError(Exception):
    """An error FedFusion raises on purpose; subclasses fix the kind (and a default reason)."""

    kind: ClassVar[Kind] = Kind.FAILURE
    default_reason: ClassVar[str] = "interrupted"

    # one positional argument: DataLoader workers re-raise an exception as type(message)
    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        assert self.reason in REASONS[self.kind], f"{self.reason!r} is not a {self.kind} reason"


class Refusal(FedFusionError):
    """The site will not do this work under its privacy policy; nothing was trained or charged."""

    kind = Kind.REFUSAL
    default_reason = "epsilon-cap"


class BadData(FedFusionError):
    """The site's data cannot be used; the detail lists every problem with its file and row."""

    kind = Kind.BAD_DATA
    default_reason = "data-unusable"


class ConfigurationError(FedFusionError):
    """A setting is unknown, missing, of the wrong type or out of range."""

    kind = Kind.CONFIGURATION
    default_reason = "run-config"


class Failure(FedFusionError):
    """The work could not be completed (the state folder, the disk, the device)."""

    kind = Kind.FAILURE
    default_reason = "state-folder"
