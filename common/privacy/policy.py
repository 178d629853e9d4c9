"""A hospital's privacy policy: what the site allows, whatever the coordinator asks.

The policy is a TOML file owned by the site (its path comes from the node config). The site
trains under the stricter of its policy and the server's proposal, and never loosens its own.
Every key is optional; the values shown are the defaults, which also apply to a site without a
policy file (a simulated hospital without one is played by the researcher: `researcher`):

    max-epsilon = 8.0            # cap on cumulative epsilon (see budget-scope)
    delta = ...                  # the site's delta (default: 1 / (10 N), N its training records);
                                 # the smaller of this and the server's is used
    max-rounds = 1000000         # the most rounds this site trains in one run
    require-dp = true            # refuse any round the server asks to run without DP
    budget-scope = "dataset"     # "dataset": the cap holds over every run on the same data
                                 # (composed); "run": per run
    min-eval-records = 20        # fewer validation records: evaluation is refused
    metric-decimals = 3          # released metrics (loss, accuracy, AUROC, F1) are rounded
    min-max-grad-norm = 0.0      # bounds on the clipping norm the server may set
    max-max-grad-norm = inf
    share-metrics = true         # false: evaluation is refused
    evaluation-share = 0.1       # the part of the epsilon cap planned for evaluation releases
                                 # (noisy score histograms, charged like training)
    share-ablation = true        # with share-metrics: the last round's evaluation also releases
                                 # the modality ablation (image only, report only, both)
    share-train-loss = false     # true: release a noisy mean training loss each round (charged)
    exact-metrics = false        # true: release evaluation metrics exactly, outside the accountant
                                 # (the default of a simulated hospital played by the researcher)
    evaluate-only = false        # true: the site never trains; it evaluates each round's model on
                                 # all its records (external validation), charged like any
                                 # evaluation, with the whole cap planned for those releases
    labels = []                  # the site's public label vocabulary: a run must name every one
                                 # of them; empty: the labels in the site's data are public
    accept-bundles = []          # SHA-256 of the run bundles the site's node takes part with;
                                 # empty: the FedFusion app at the installed version (client.bundle)
    secure-aggregation = "allow" # "require": train only inside secure aggregation (the coordinator
                                 # sees only the cohort's sum); "off": never take part in it
    min-secagg-sites = 3         # the fewest sites whose sum the site's update may hide in
    secagg-colluders = 1         # the most sites the site assumes collude with the coordinator
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigurationError

BUDGET_SCOPES = ("run", "dataset")
SECURE_AGGREGATION = ("require", "allow", "off")
MAX_SECAGG_SITES = 64  # common.secagg.params.MAX_COHORT: the protocol's complete graph


class PolicyError(ConfigurationError):
    """The site's policy file is missing or invalid."""

    default_reason = "policy"


@dataclass(frozen=True)
class SitePolicy:
    """A site's privacy policy (defaults apply when a site has no policy file)."""

    max_epsilon: float = 8.0  # cap on the cumulative epsilon over the budget scope
    delta: float | None = None  # None: at most 1 / (10 N) for a site of N training records
    max_rounds: int = 1_000_000
    require_dp: bool = True
    budget_scope: str = "dataset"  # every run on the same data composes into one budget
    min_max_grad_norm: float = 0.0
    max_max_grad_norm: float = math.inf
    share_metrics: bool = True
    evaluation_share: float = 0.1  # of the epsilon cap, planned for the evaluation releases
    share_ablation: bool = True  # the modality ablation's metrics (with share-metrics only)
    share_train_loss: bool = False  # a noisy mean training loss each round (charged)
    exact_metrics: bool = False  # evaluation metrics released exactly, outside the accountant
    evaluate_only: bool = False  # never trains: evaluates every record (external validation)
    labels: tuple[str, ...] = ()  # the public label vocabulary; empty: the data's labels are public
    min_eval_records: int = 20  # fewer validation records: no evaluation metrics are released
    metric_decimals: int = 3  # released metrics are rounded to this many decimals
    accept_bundles: tuple[str, ...] = ()  # SHA-256 of the only run bundles to take part with
    secure_aggregation: str = "allow"  # "require" | "allow" | "off"
    min_secagg_sites: int = 3  # the fewest sites a secure sum of its update may have
    secagg_colluders: int = 1  # the most sites it assumes collude with the coordinator

    def __post_init__(self) -> None:
        checks = [
            (self.max_epsilon > 0, "max-epsilon must be > 0"),
            (self.delta is None or 0 < self.delta <= 1, "delta must be in (0, 1]"),
            (self.min_eval_records >= 1, "min-eval-records must be >= 1"),
            (0 < self.evaluation_share < 1, "evaluation-share must be in (0, 1)"),
            (
                len(set(self.labels)) == len(self.labels) and all(self.labels),
                "labels must be distinct, non-empty names",
            ),
            (0 <= self.metric_decimals <= 6, "metric-decimals must be from 0 to 6"),
            (
                self.share_metrics or not self.evaluate_only,
                "evaluate-only needs share-metrics = true (a site that neither trains nor "
                "evaluates takes no part)",
            ),
            (self.max_rounds >= 1, "max-rounds must be >= 1"),
            (
                self.secure_aggregation in SECURE_AGGREGATION,
                f"secure-aggregation must be one of {SECURE_AGGREGATION}",
            ),
            (
                2 <= self.min_secagg_sites <= MAX_SECAGG_SITES,
                f"min-secagg-sites must be from 2 to {MAX_SECAGG_SITES}",
            ),
            (
                0 <= self.secagg_colluders < self.min_secagg_sites,
                "secagg-colluders must be >= 0 and below min-secagg-sites (with as many "
                "colluders as sites, the sum hides nothing)",
            ),
            (self.budget_scope in BUDGET_SCOPES, f"budget-scope must be one of {BUDGET_SCOPES}"),
            (
                0 <= self.min_max_grad_norm <= self.max_max_grad_norm,
                "need 0 <= min-max-grad-norm <= max-max-grad-norm",
            ),
            (
                all(
                    len(h) == 64 and all(c in "0123456789abcdef" for c in h)
                    for h in self.accept_bundles
                ),
                "accept-bundles must list SHA-256 hashes (64 lowercase hex digits)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PolicyError(message)

    @classmethod
    def researcher(cls, *, dp: bool) -> SitePolicy:
        """A simulated hospital's policy without a file: the researcher who set `dp` plays it."""
        return cls(
            max_epsilon=math.inf,
            delta=1.0,
            require_dp=dp,
            budget_scope="run",
            min_eval_records=1,
            metric_decimals=6,
            exact_metrics=True,
            share_train_loss=True,
        )

    def delta_for(self, num_examples: int) -> float:
        """The site's delta for `num_examples` training records."""
        return self.delta if self.delta is not None else 1.0 / (10 * max(num_examples, 1))


def _field_types() -> dict[str, str]:
    return {f.name.replace("_", "-"): str(f.type) for f in dataclasses.fields(SitePolicy)}


def _typed(key: str, kind: str, value: Any) -> Any:
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if (
        kind.startswith("tuple")
        and isinstance(value, list)
        and all(isinstance(v, str) for v in value)
    ):
        return tuple(value)
    raise PolicyError(f"'{key}' must be a {kind}, got {value!r}.")


def load_policy(path: Path) -> SitePolicy:
    """Read and check a policy file; every problem is a PolicyError naming the file."""
    if not path.is_file():
        raise PolicyError(f"Privacy policy file {path} does not exist (node config key 'policy').")
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"Privacy policy {path} is not valid TOML: {err}.") from err
    types = _field_types()
    unknown = sorted(set(table) - set(types))
    if unknown:
        raise PolicyError(
            f"Privacy policy {path}: unknown key(s) {unknown}; known: {sorted(types)}."
        )
    try:
        values = {k.replace("-", "_"): _typed(k, types[k], v) for k, v in table.items()}
        return SitePolicy(**values)
    except PolicyError as err:
        raise PolicyError(f"Privacy policy {path}: {err}") from err
