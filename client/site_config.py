"""What a hospital knows about itself: its data, state folder, policy, split, device, model files.

These facts come from the node's own configuration (`fedfusion node --node-config`, or
`flower-supernode --node-config`), never from the coordinator: `SiteConfig.localize` replaces
the run config's values for them, with a log line when the run config asked for something else.
In a simulation Flower sets only `partition-id`, which maps to the simulated hospital's folder
`<data-root>/hospital-<i>/`; the researcher plays every hospital there, so the run config's
split, device and model sources apply (`data-root` and `state-root` are simulation-only keys,
inert at a deployed node: it always has its own `manifest`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.config import DEVICE_PATTERN, RunConfig, run_config_keys
from common.errors import ConfigurationError, Refusal
from common.privacy.accounting import local_steps

log = logging.getLogger(__name__)

NODE_KEYS_FLOWER = ("partition-id", "num-partitions")  # set by Flower's simulation runtime
LIMIT_KEYS = (
    "max-message-mb",
    "max-image-size",
    "max-steps",
    "max-batch",
    "max-round-seconds",
)
NODE_KEYS = (
    "manifest",
    "site-name",
    "state-dir",
    "policy",
    "device",
    "val-fraction",
    "split-seed",
    "image-weights",
    "text-encoder",
    "run-config-keys",
    "torch-threads",
    "secagg-identity",
    "secagg-roster",
    *LIMIT_KEYS,
)
MAX_TORCH_THREADS = 1024  # a bound on `torch-threads`, far above any machine's cores
POLICY_FILE = "policy.toml"  # a simulated hospital's policy, when its folder has one
STATE_FOLDER = "state"
# Model sources a deployed site takes from the run config (names, never paths): a builtin
# config, an installed top-level package, a torchvision weight name.
SAFE_TEXT_SOURCE = re.compile(r"builtin:[a-z0-9-]+|pkg:[A-Za-z_][A-Za-z0-9_]*")
SAFE_IMAGE_WEIGHTS = re.compile(r"[A-Z][A-Z0-9_]*")


class NodeConfigError(ConfigurationError):
    """The node's own configuration is incomplete, unknown or out of range."""

    default_reason = "node-config"


@dataclass(frozen=True, kw_only=True)
class SiteLimits:
    """What one round may ask of the site's machine (node config); past a bound it refuses.

    The defaults fit every preset's honest rounds with room to spare; a site lowers them to its
    machine. A refusal comes before the work it bounds, so nothing is trained or charged.
    """

    max_message_mb: float = 256.0  # the largest round message the node unpacks (its arrays'
    # declared sizes, read from the message's object tree before any array is pulled)
    max_image_size: int = 512  # image side in pixels: activations grow with its square
    max_steps: int = 10_000  # optimizer steps in one round (local-steps, or epochs x batches)
    max_batch: int = 4096  # expected batch of one step: memory grows with it (per-sample
    # gradients of every trainable parameter); the DP recipe raises a batch at most to it
    max_round_seconds: float = 3600.0  # local training in one round; stopped past it, unsent

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteLimits:
        """The bounds the node config sets (`max-message-mb`, ...), the defaults for the rest."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in node_config:
                continue
            value, whole = node_config[key], f.type in ("int", int)
            if (
                isinstance(value, bool)
                or not isinstance(value, int if whole else (int, float))
                or not 0 < value < math.inf
            ):
                raise NodeConfigError(
                    f"node config {key}={value!r}: it must be a positive "
                    f"{'whole number' if whole else 'number'}."
                )
            values[f.name] = value if whole else float(value)
        return cls(**values)

    @property
    def max_message_bytes(self) -> int:
        """`max-message-mb` in bytes."""
        return int(self.max_message_mb * 2**20)

    def check_run(self, run: RunConfig) -> None:
        """Refuse a run config that asks more than these bounds, before anything else runs."""
        if run.train.batch_size > self.max_batch:
            raise _beyond(f"batch-size {run.train.batch_size}", "max-batch", self.max_batch)
        if run.model.image_size > self.max_image_size:
            raise _beyond(
                f"image-size {run.model.image_size}", "max-image-size", self.max_image_size
            )
        # each epoch is at least one step: the exact count needs the data (`check_round`)
        asked = run.train.local_steps or run.train.local_epochs
        if asked > self.max_steps:
            raise _beyond(f"{asked} steps a round", "max-steps", self.max_steps)

    def check_round(self, run: RunConfig, *, num_examples: int) -> None:
        """Refuse a round of more optimizer steps than `max-steps` on this site's data."""
        steps = local_steps(
            num_examples=num_examples,
            batch_size=run.train.batch_size,
            epochs=run.train.local_epochs,
            steps_per_round=run.train.local_steps,
        )
        if steps > self.max_steps:
            raise _beyond(f"{steps} steps a round", "max-steps", self.max_steps)

    def deadline(self) -> Deadline:
        """The end of this round's local training, `max-round-seconds` from now."""
        return Deadline(
            at=time.monotonic() + self.max_round_seconds, seconds=self.max_round_seconds
        )


def _beyond(asked: str, key: str, bound: float) -> Refusal:
    return Refusal(
        f"the run asks for {asked}, beyond this site's {key} = {bound:g} (node "
        "config); nothing was trained or charged.",
        reason="resource-limit",
    )


T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """When a round's local training must have ended (`SiteLimits.max_round_seconds`)."""

    at: float  # time.monotonic()
    seconds: float

    def bound(self, loader: Iterable[T]) -> Bounded[T]:
        """`loader`, refusing to hand out a batch past the deadline (the round is not sent)."""
        return Bounded(loader, self)

    def check(self) -> None:
        """Refuse once the deadline has passed."""
        if time.monotonic() > self.at:
            raise _beyond(
                f"more than {self.seconds:g} s of local training", "max-round-seconds", self.seconds
            )


class Bounded(Generic[T]):
    """A loader whose every batch is handed out before a deadline (its length is the loader's)."""

    def __init__(self, loader: Iterable[T], deadline: Deadline) -> None:
        self.loader, self.deadline = loader, deadline

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # a DataLoader: Sized, not in the type

    def __iter__(self) -> Iterator[T]:
        for batch in self.loader:
            self.deadline.check()
            yield batch


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One hospital's own facts."""

    site_name: str
    manifest: Path
    state_dir: Path
    policy: Path | None = None  # None: the default policy (common.privacy.policy)
    simulated: bool = False  # a simulated hospital: the researcher plays it
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    val_fraction: float = 0.2  # of the site's patients, held out for validation
    split_seed: int = 0  # the seed of the site's patient-level split
    image_weights: str | None = None  # None: the run config's, if it is a safe name
    text_encoder: str | None = None  # None: the run config's, if it is a safe name
    limits: SiteLimits = SiteLimits()  # what a round may ask of the site's machine
    run_config_keys: frozenset[str] | None = None  # keys a run may set differently from the
    # defaults installed here (`fedfusion node` checks them); None: any key
    torch_threads: int = 1  # torch's intra-op threads in the node (0: torch's default, one per
    # core): the SuperNode and, on a shared machine, other sites compete for the same cores
    # secure aggregation: the key this site signs its round keys with (its SuperNode's
    # authentication key), and the consortium's public keys it accepts (one per line)
    secagg_identity: Path | None = None
    secagg_roster: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        """The site of a deployed node (`manifest`, `state-dir`, ...) or of a simulated one.

        Simulation: Flower sets only `partition-id`, which maps to `<data-root>/hospital-<i>`;
        the hospital's policy is `policy.toml` in that folder if present, its state folder is
        `<state-root or data-root>/hospital-<i>/state`, and the run config's split and device
        apply.
        """
        _check_keys(node_config)
        if "partition-id" in node_config and "manifest" not in node_config:
            return cls._simulated(node_config, run)
        return cls.deployed(node_config)

    @classmethod
    def _simulated(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        name = f"hospital-{int(node_config['partition-id'])}"
        folder = Path(run.data.data_root).expanduser() / name
        state_root = Path(run.data.state_root or run.data.data_root).expanduser()
        policy = node_config.get("policy") or (
            folder / POLICY_FILE if (folder / POLICY_FILE).is_file() else None
        )
        return cls(
            site_name=str(node_config.get("site-name") or name),
            manifest=folder,
            state_dir=state_root / name / STATE_FOLDER,
            policy=Path(str(policy)) if policy else None,
            simulated=True,
            device=run.train.device,
            val_fraction=run.data.val_fraction,
            split_seed=run.model.seed,
            limits=SiteLimits.from_node_config(node_config),
        )

    @classmethod
    def deployed(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """A deployed hospital's site: `manifest` and `state-dir` required, the rest optional."""
        _check_keys(node_config)
        if "manifest" not in node_config:
            raise NodeConfigError(
                "This node has no data: set its manifest with fedfusion node --node-config "
                "\"manifest='/path/to/manifest.csv' state-dir=...\"."
            )
        if "state-dir" not in node_config:
            raise NodeConfigError(
                "This node has no state-dir: the site keeps its privacy ledger there, so that "
                "a restart cannot reset what it has spent. Add state-dir='/a/private/folder' "
                "to --node-config."
            )
        manifest = Path(str(node_config["manifest"])).expanduser()
        folder = manifest if manifest.is_dir() else manifest.parent
        policy = node_config.get("policy")
        site = cls(
            site_name=str(node_config.get("site-name") or folder.resolve().name),
            manifest=manifest,
            state_dir=Path(str(node_config["state-dir"])).expanduser(),
            policy=Path(str(policy)).expanduser() if policy else None,
            device=str(node_config.get("device", "auto")),
            val_fraction=node_config.get("val-fraction", 0.2),
            split_seed=node_config.get("split-seed", 0),
            image_weights=_text(node_config, "image-weights"),
            text_encoder=_text(node_config, "text-encoder"),
            limits=SiteLimits.from_node_config(node_config),
            run_config_keys=_keys(node_config),
            torch_threads=node_config.get("torch-threads", 1),
            secagg_identity=_path(node_config, "secagg-identity"),
            secagg_roster=_path(node_config, "secagg-roster"),
        )
        site._check()
        return site

    def _check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise NodeConfigError(
                f"node config device={self.device!r}: use auto, cpu, cuda or cuda:N."
            )
        fraction = self.val_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction < 1
        ):
            raise NodeConfigError(
                f"node config val-fraction={fraction!r}: it must be a number "
                "between 0 and 1 (the share of patients held out)."
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise NodeConfigError(
                f"node config split-seed={self.split_seed!r}: it must be an integer."
            )
        threads = self.torch_threads
        if (
            isinstance(threads, bool)
            or not isinstance(threads, int)
            or not 0 <= threads <= MAX_TORCH_THREADS
        ):
            raise NodeConfigError(
                f"node config torch-threads={threads!r}: it must be a whole number from 0 "
                f"(torch's default: one thread per core) to {MAX_TORCH_THREADS}; the default, 1, "
                "leaves the other cores to the SuperNode and the machine's other work."
            )

    def localize(self, run: RunConfig) -> RunConfig:
        """The run config as this site runs it: its own split, device and model sources.

        A deployed site never reads a path from the run config: a model source the node config
        does not set must be a name (`SAFE_TEXT_SOURCE`, `SAFE_IMAGE_WEIGHTS`), else the site
        refuses before touching the file system. A run beyond the site's resource bounds
        (`SiteLimits`) is refused first.
        """
        self.limits.check_run(run)
        if self.simulated:
            return run
        model = dataclasses.replace(
            run.model,
            text_encoder=self._source(
                "text-encoder", self.text_encoder, run.model.text_encoder, SAFE_TEXT_SOURCE
            ),
            image_weights=self._source(
                "image-weights", self.image_weights, run.model.image_weights, SAFE_IMAGE_WEIGHTS
            ),
        )
        for key, asked, own in (
            ("device", run.train.device, self.device),
            ("val-fraction", run.data.val_fraction, self.val_fraction),
        ):
            if asked != own:
                log.info(
                    "site %s: the run config's %s=%r is not used; this site's node config "
                    "decides (%s=%r)",
                    self.site_name,
                    key,
                    asked,
                    key,
                    own,
                )
        return dataclasses.replace(
            run,
            model=model,
            data=dataclasses.replace(run.data, val_fraction=float(self.val_fraction)),
            train=dataclasses.replace(run.train, device=self.device),
        )

    def _source(self, key: str, own: str | None, asked: str, safe: re.Pattern[str]) -> str:
        if own is not None:
            if asked and asked != own:
                log.info(
                    "site %s: the run config's %s is not used; this site's node config "
                    "names its own",
                    self.site_name,
                    key,
                )
            return own
        if asked and not safe.fullmatch(asked):
            raise NodeConfigError(
                f"the run config sets {key} to a value that is not a model name; this site "
                f"loads model files only from its own node config. Set {key}=... in the node "
                "config (the coordinator checks the result through the frozen-part fingerprint).",
                reason="model-source",
            )
        return asked


def _check_keys(node_config: Mapping[str, Any]) -> None:
    unknown = sorted(set(node_config) - set(NODE_KEYS) - set(NODE_KEYS_FLOWER))
    if unknown:
        raise NodeConfigError(
            f"Unknown node config key(s) {unknown}; known: {sorted(NODE_KEYS)}. Example: "
            "fedfusion node --node-config \"manifest='/data/site/manifest.csv' "
            "state-dir='/var/lib/fedfusion' policy='/etc/fedfusion/policy.toml'\"."
        )


def _keys(node_config: Mapping[str, Any]) -> frozenset[str] | None:
    """`run-config-keys` ("key,key,..."): None when the node config does not set it."""
    value = node_config.get("run-config-keys")
    if value is None:
        return None
    if not isinstance(value, str):
        raise NodeConfigError(
            f"node config run-config-keys={value!r}: list run-config keys "
            "separated by commas, e.g. 'num-server-rounds,learning-rate'."
        )
    keys = frozenset(k.strip() for k in value.split(",") if k.strip())
    if unknown := sorted(keys - set(run_config_keys())):
        raise NodeConfigError(
            f"node config run-config-keys names unknown run-config key(s) "
            f"{unknown}; see the README's configuration reference."
        )
    return keys


def _path(node_config: Mapping[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise NodeConfigError(f"node config {key}={value!r}: it must be a file path.")
    return Path(value).expanduser()


def _text(node_config: Mapping[str, Any], key: str) -> str | None:
    value = node_config.get(key)
    return None if value is None else str(value)
