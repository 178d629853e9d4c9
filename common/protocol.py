"""What travels between the coordinator and the sites: record keys, metric names, error replies.

Defined once for both sides. A round message carries the global trainable parameters and a
ConfigRecord of per-round facts only (the round, the run key, the frozen part's fingerprint);
every run setting reaches a site through the run config. A reply carries the parameters the site
trained, the names of those it did not, a fixed set of scalar metrics, and its name; or an error
whose Flower code says its kind (`common.errors.Kind`) and whose reason is one word of a fixed
vocabulary and the site's name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import REASONS, Kind

# RecordDict keys (Flower's strategies use "arrays" / "config" by default).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"  # ConfigRecord in replies: the site's self-chosen name, nothing else
# secure aggregation (server.secure, client.secure): each stage's message type is
# "train.<action>"; its protocol fields travel in a ConfigRecord (common.secagg.wire)
SECAGG = "secagg"
MASKED = "masked"  # ArrayRecord of stage 3's reply: the masked vector, under MASKED_VECTOR
MASKED_VECTOR = "vector"
SECAGG_KEYS, SECAGG_SHARES, SECAGG_MASK, SECAGG_REVEAL = (
    "secagg_keys",
    "secagg_shares",
    "secagg_mask",
    "secagg_reveal",
)
SECAGG_MAX_GRAD_NORM = "max-grad-norm"  # stage 1: the clipping norm the sum is calibrated to
SECAGG_NOISE_SHARES = "noise-shares"  # stage 1: d, the honest shares the noise is split into
SECAGG_NOISE_MULTIPLIER = "noise-multiplier"  # stage 2: z, the sum's noise multiplier
# ConfigRecord in train replies: which global trainable parameters the site did not train this
# round (e.g. text-side ones at a site without reports). Its ArrayRecord then holds only the
# others; the server aggregates each parameter over the sites that trained it.
UPDATE = "update"
UNTRAINED = "untrained"  # list[str] of parameter names, possibly empty

# Round ConfigRecord (server -> site): per-round facts only.
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_KEY = "run-key"  # the run's name for the sites' ledgers; stable when a run is resumed
FROZEN_FINGERPRINT = "frozen-fingerprint"  # SHA-256 of the frozen part the parameters belong to
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx; sites read mu from the run config

# Site ConfigRecord (site -> server).
SITE_NAME = "site-name"
# ArrayRecord in evaluate replies: the released score counts, "<view>/scores" and
# "<view>/confusion" (`common.training.score_counts`; views: `common.training.ablation.VIEWS`)
COUNTS = "counts"

# The global parameters a site computes on: no honest model comes near this magnitude
# (pretrained weights are within about 2, DP-trained heads far less), and a bound on the
# weights keeps every activation and gradient of the shipped architectures finite.
MAX_PARAMETER_ABS = 100.0

# Metric names. Every train reply carries exactly TRAIN_METRICS, every evaluate reply
# exactly EVAL_METRICS, whatever the site's settings (Flower aborts on mismatched keys).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative over the run; inf when the site trained without DP
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
# The site's effective cap on its run epsilon: the stricter of the server's target and its policy's
# max-epsilon (inf without DP); and the per-sample clipping norm it trained with (its policy may
# narrow the server's max-grad-norm). Both for the coordinator's plots and the run report.
EPSILON_CAP = "epsilon-cap"
MAX_GRAD_NORM = "max-grad-norm"
LOSS = "loss"
COUNT_NOISE = "count-noise"  # standard deviation of the noise on each released count (0: exact)
# 1.0: an evaluation-only site (external validation): every record it evaluates is held out
EXTERNAL = "external"
ACCURACY = "accuracy"
AUROC = "auroc"
F1 = "f1"

# Modality ablation: a site scores its validation rows that have both modalities three times,
# with both, with the image only (the report masked) and with the report only (the image masked);
# with structured fields declared, twice more: the fields only, and every modality but the fields.
# nan when its policy withholds them (share-ablation = false) or too few rows have both, and the
# fields' two when the run declares no fields.
ACCURACY_BOTH, AUROC_BOTH = "accuracy-both", "auroc-both"
ACCURACY_IMAGE_ONLY, AUROC_IMAGE_ONLY = "accuracy-image-only", "auroc-image-only"
ACCURACY_TEXT_ONLY, AUROC_TEXT_ONLY = "accuracy-text-only", "auroc-text-only"
ACCURACY_FIELDS_ONLY, AUROC_FIELDS_ONLY = "accuracy-fields-only", "auroc-fields-only"
ACCURACY_WITHOUT_FIELDS, AUROC_WITHOUT_FIELDS = "accuracy-without-fields", "auroc-without-fields"
ABLATION_METRICS = (
    ACCURACY_BOTH,
    AUROC_BOTH,
    ACCURACY_IMAGE_ONLY,
    AUROC_IMAGE_ONLY,
    ACCURACY_TEXT_ONLY,
    AUROC_TEXT_ONLY,
    ACCURACY_FIELDS_ONLY,
    AUROC_FIELDS_ONLY,
    ACCURACY_WITHOUT_FIELDS,
    AUROC_WITHOUT_FIELDS,
)
# The ablation's view (common.training.ablation) behind each pair of metrics above.
ABLATION_KEYS = {
    "both": (ACCURACY_BOTH, AUROC_BOTH),
    "image": (ACCURACY_IMAGE_ONLY, AUROC_IMAGE_ONLY),
    "text": (ACCURACY_TEXT_ONLY, AUROC_TEXT_ONLY),
    "tabular": (ACCURACY_FIELDS_ONLY, AUROC_FIELDS_ONLY),
    "no-tabular": (ACCURACY_WITHOUT_FIELDS, AUROC_WITHOUT_FIELDS),
}

TRAIN_METRICS = (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    EPSILON,
    DELTA,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    STEPS,
    TRAIN_SECONDS,
    EPSILON_CAP,
    MAX_GRAD_NORM,
)
EVAL_METRICS = (
    NUM_EXAMPLES,
    LOSS,
    ACCURACY,
    AUROC,
    F1,
    *ABLATION_METRICS,
    COUNT_NOISE,
    EXTERNAL,
)
# Per-site privacy facts: reported per site, never averaged across sites.
PRIVACY_METRICS = (
    EPSILON,
    DELTA,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    STEPS,
    EPSILON_CAP,
    MAX_GRAD_NORM,
    COUNT_NOISE,
)

# Everything a reply may carry, and what protects it: "dp" (a noisy release charged to the
# site's account, or the DP-SGD update), "public" (a fact the site publishes: its policy, its
# settings, the sizes of its splits; documented in README "Privacy"). A test fails when a reply
# carries a key without a status here. Keys are "<record>" or "<record>/<item>".
RELEASES: dict[str, str] = {
    f"{ARRAYS}": "dp",  # the trained parameters (DP-SGD); their names are the model's
    f"{UPDATE}/{UNTRAINED}": "public",  # which modalities the site's training rows hold
    f"{METRICS}/{NUM_EXAMPLES}": "public",  # training (train) or validation (evaluate) records
    f"{METRICS}/{TRAIN_LOSS}": "dp",  # nan unless the policy shares it, then noisy and charged
    f"{METRICS}/{EPSILON}": "public",
    f"{METRICS}/{DELTA}": "public",
    f"{METRICS}/{NOISE_MULTIPLIER}": "public",
    f"{METRICS}/{SAMPLE_RATE}": "public",
    f"{METRICS}/{STEPS}": "public",
    f"{METRICS}/{TRAIN_SECONDS}": "public",  # the coordinator times the reply anyway
    f"{METRICS}/{EPSILON_CAP}": "public",
    f"{METRICS}/{MAX_GRAD_NORM}": "public",
    f"{METRICS}/{COUNT_NOISE}": "public",
    f"{METRICS}/{EXTERNAL}": "public",  # the site's policy: evaluate-only
    **{f"{METRICS}/{key}": "dp" for key in (LOSS, ACCURACY, AUROC, F1, *ABLATION_METRICS)},
    f"{COUNTS}": "dp",  # the score counts with Gaussian noise, charged
    f"{SITE}/{SITE_NAME}": "public",
}

# --- error replies --------------------------------------------------------------------------

# Flower error codes of a site's error reply, one per kind (Flower's own codes are 0..8).
ERROR_CODES: dict[Kind, int] = {
    Kind.REFUSAL: 101,
    Kind.BAD_DATA: 102,
    Kind.CONFIGURATION: 103,
    Kind.FAILURE: 104,
    Kind.BUG: 105,
}


@dataclass(frozen=True, kw_only=True)
class SiteError:
    """A site's error reply as the coordinator reads it."""

    kind: Kind
    site: str | None  # the name the site gave, None if the reply is not one of a FedFusion site
    text: str  # "<reason>: <explanation>", or Flower's own text for a crash it caught


def error_reason(site_name: str, text: str) -> str:
    """The reason string of a site's error reply: names the site (an error carries no records)."""
    return f"site '{site_name}': {text}"


def read_error(code: int, reason: str) -> SiteError:
    """Unpack an error reply (Flower's codes, for a crash or a lost node, become `failure`)."""
    kind = next((k for k, c in ERROR_CODES.items() if c == code), Kind.FAILURE)
    site = None
    if reason.startswith("site '") and "': " in reason:
        site, _, reason = reason[len("site '") :].partition("': ")
    return SiteError(kind=kind, site=site, text=reason)


def known_reason(kind: Kind, reason: str) -> bool:
    """Whether `reason` belongs to the fixed vocabulary of `kind`."""
    return reason in REASONS[kind]


# --- what an update is -------------------------------------------------------------------------


def update_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of an update as sent: names, dtypes, shapes and bytes, in order.

    Accepts torch tensors or numpy arrays, so a site and the server hash the same bytes.
    """
    digest = hashlib.sha256()
    for name, value in arrays.items():
        arr = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else value)
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
