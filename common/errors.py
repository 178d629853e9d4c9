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


# The fixed vocabulary of reasons a reply may carry, per kind, and the one sentence that goes with
# each: all the other side learns of a problem (the detail stays in the site's own log).
REASON_TEXT: dict[Kind, dict[str, str]] = {
    Kind.REFUSAL: {
        "dp-required": "the site's policy requires differential privacy",
        "epsilon-cap": "the round would exceed the site's epsilon cap",
        "max-rounds": "the site has trained the most rounds its policy allows in one run",
        "budget-exhausted": "the site's privacy budget for its data is spent",
        "metrics-withheld": "the site's policy does not release evaluation metrics",
        "run-key-conflict": "this Flower run already trains under another run key at the site",
        "data-changed": "the site's data changed during this run",
        "bundle-not-accepted": "the run's bundle is not accepted at the site",
        "too-few-records": "the site holds too few validation records to release metrics",
        "evaluation-limit": "the site already evaluated this round of this run",
        "evaluate-only": "the site only evaluates (external validation); it never trains",
        "release-not-planned": "the run's privacy plan at the site has no budget for this release",
        "labels-not-covered": "the run's class names do not cover the site's published labels",
        "state-incomplete": (
            "the site's privacy records are incomplete; its operator must restore them"
        ),
        # the site's own resource bounds (node config): nothing trained, nothing charged
        "resource-limit": "the round asks for more than the site's resource limits allow",
        "message-too-large": "the round message is larger than the site unpacks",
        "accounting-limit": "the run's privacy accounting would exceed the site's bounds on "
        "steps, time or memory",
        "run-config-not-accepted": "the run config changes settings the site does not let a run "
        "change",
        # secure aggregation (common.secagg): the coordinator's request breaks the site's rules
        "secagg-unsafe": "the secure aggregation request breaks the site's safety rules",
        "secagg-required": "the site trains only inside secure aggregation",
    },
    Kind.BAD_DATA: {
        "data-unusable": "the site's data cannot be used as it is",
        "no-training-rows": "the site has no training records",
    },
    Kind.CONFIGURATION: {
        "run-config": "the run config is not valid at the site",
        "node-config": "the site's own configuration is not valid",
        "policy": "the site's policy file is not valid",
        "model-mismatch": "the model does not match the site's (frozen part or trainable names)",
        "model-source": "the run config names a model source the site does not load",
        "message": "the round message is malformed",
    },
    Kind.FAILURE: {
        "state-folder": "the site's state folder cannot be used",
        "device": "the site's device is not available",
        "interrupted": "the site's work was interrupted",
        "secagg-dropouts": "too few sites remained for secure aggregation to recover the sum",
    },
    Kind.BUG: {"internal-error": "an internal error (a defect in FedFusion) stopped the site"},
}
REASONS: dict[Kind, tuple[str, ...]] = {kind: tuple(texts) for kind, texts in REASON_TEXT.items()}


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

    @property
    def public(self) -> str:
        """What the other side may learn: `<kind>: <reason>: <the reason's fixed sentence>`."""
        return public_text(self.kind, self.reason)


def public_text(kind: Kind, reason: str) -> str:
    """The fixed text of a reason, as a reply carries it."""
    label = "refused" if kind is Kind.REFUSAL else str(kind)
    return f"{label}: {reason}: {REASON_TEXT[kind][reason]}"


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
