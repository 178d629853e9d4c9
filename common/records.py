"""Message record keys and metric names, defined once for the server and the sites."""

# RecordDict keys (Flower's strategies use "arrays" / "config" by default).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"  # ConfigRecord in replies: the site's self-chosen name, nothing else
# ConfigRecord in train replies: which global trainable parameters the site did not train this
# round (e.g. text-side ones at a site without reports). Its ArrayRecord then holds only the
# others; the server aggregates each parameter over the sites that trained it.
UPDATE = "update"
UNTRAINED = "untrained"  # list[str] of parameter names, possibly empty

# Round ConfigRecord (server -> site).
SERVER_ROUND = "server-round"  # injected by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx
RUN_KEY = "run-key"  # the run's name for the sites' ledgers; stable when a run is resumed
NUM_ROUNDS = "num-rounds"
LEARNING_RATE = "learning-rate"
FROZEN_FINGERPRINT = "frozen-fingerprint"
DP = "dp"
TARGET_EPSILON = "target-epsilon"
TARGET_DELTA = "target-delta"

# Site ConfigRecord (site -> server).
SITE_NAME = "site-name"


def site_error_reason(site_name: str, cause: str) -> str:
    """The reason of a site's error reply: names the site, since an error carries no records."""
    return f"site '{site_name}': {cause}"


REFUSAL_PREFIX = "refused: "  # a site's privacy refusal: "site 'x': refused: <why>"


def is_refusal(reason: str) -> bool:
    """Whether an error reply's reason is a site's privacy refusal (not a failure)."""
    return reason.partition("': ")[2].startswith(REFUSAL_PREFIX)


def site_of_error_reason(reason: str) -> str | None:
    """The site name in a reason written by `site_error_reason`, else None."""
    if reason.startswith("site '") and "': " in reason:
        return reason[len("site '"):reason.index("': ")]
    return None

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
ACCURACY = "accuracy"
AUROC = "auroc"
F1 = "f1"

TRAIN_METRICS = (
    NUM_EXAMPLES, TRAIN_LOSS, EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, TRAIN_SECONDS,
    EPSILON_CAP, MAX_GRAD_NORM,
)
EVAL_METRICS = (NUM_EXAMPLES, LOSS, ACCURACY, AUROC, F1)
# Per-site privacy facts: reported per site, never averaged across sites.
PRIVACY_METRICS = (EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, EPSILON_CAP, MAX_GRAD_NORM)

# History-only keys (server/history.py): a site's training and validation sizes, since train and
# evaluate replies both call theirs `num-examples`.
TRAIN_EXAMPLES = "train-examples"
VAL_EXAMPLES = "val-examples"
