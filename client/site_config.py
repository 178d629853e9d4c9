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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DEVICE_PATTERN, RunConfig
from common.errors import ConfigurationError

log = logging.getLogger(__name__)

NODE_KEYS_FLOWER = ("partition-id", "num-partitions")  # set by Flower's simulation runtime
NODE_KEYS = ("manifest", "site-name", "state-dir", "policy", "device", "val-fraction",
             "split-seed", "image-weights", "text-encoder")
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
            folder / POLICY_FILE if (folder / POLICY_FILE).is_file() else None)
        return cls(site_name=str(node_config.get("site-name") or name), manifest=folder,
                   state_dir=state_root / name / STATE_FOLDER,
                   policy=Path(str(policy)) if policy else None, simulated=True,
                   device=run.train.device, val_fraction=run.data.val_fraction,
                   split_seed=run.model.seed)

    @classmethod
    def deployed(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """A deployed hospital's site: `manifest` and `state-dir` required, the rest optional."""
        _check_keys(node_config)
        if "manifest" not in node_config:
            raise NodeConfigError(
                "This node has no data: set its manifest with fedfusion node --node-config "
                "\"manifest='/path/to/manifest.csv' state-dir=...\".")
        if "state-dir" not in node_config:
            raise NodeConfigError(
                "This node has no state-dir: the site keeps its privacy ledger there, so that "
                "a restart cannot reset what it has spent. Add state-dir='/a/private/folder' "
                "to --node-config.")
        manifest = Path(str(node_config["manifest"])).expanduser()
        folder = manifest if manifest.is_dir() else manifest.parent
        policy = node_config.get("policy")
        site = cls(site_name=str(node_config.get("site-name") or folder.resolve().name),
                   manifest=manifest, state_dir=Path(str(node_config["state-dir"])).expanduser(),
                   policy=Path(str(policy)).expanduser() if policy else None,
                   device=str(node_config.get("device", "auto")),
                   val_fraction=node_config.get("val-fraction", 0.2),  # type: ignore[arg-type]
                   split_seed=node_config.get("split-seed", 0),  # type: ignore[arg-type]
                   image_weights=_text(node_config, "image-weights"),
                   text_encoder=_text(node_config, "text-encoder"))
        site._check()
        return site

    def _check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise NodeConfigError(f"node config device={self.device!r}: use auto, cpu, cuda or "
                                  "cuda:N.")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise NodeConfigError(f"node config val-fraction={fraction!r}: it must be a number "
                                  "between 0 and 1 (the share of patients held out).")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise NodeConfigError(f"node config split-seed={self.split_seed!r}: it must be an "
                                  "integer.")

    def localize(self, run: RunConfig) -> RunConfig:
        """The run config as this site runs it: its own split, device and model sources.

        A deployed site never reads a path from the run config: a model source the node config
        does not set must be a name (`SAFE_TEXT_SOURCE`, `SAFE_IMAGE_WEIGHTS`), else the site
        refuses before touching the file system.
        """
        if self.simulated:
            return run
        model = dataclasses.replace(run.model,
                                    text_encoder=self._source("text-encoder", self.text_encoder,
                                                              run.model.text_encoder,
                                                              SAFE_TEXT_SOURCE),
                                    image_weights=self._source("image-weights", self.image_weights,
                                                               run.model.image_weights,
                                                               SAFE_IMAGE_WEIGHTS))
        for key, asked, own in (("device", run.train.device, self.device),
                                ("val-fraction", run.data.val_fraction, self.val_fraction)):
            if asked != own:
                log.info("site %s: the run config's %s=%r is not used; this site's node config "
                         "decides (%s=%r)", self.site_name, key, asked, key, own)
        return dataclasses.replace(
            run, model=model, data=dataclasses.replace(run.data, val_fraction=float(self.val_fraction)),
            train=dataclasses.replace(run.train, device=self.device))

    def _source(self, key: str, own: str | None, asked: str, safe: re.Pattern[str]) -> str:
        if own is not None:
            if asked and asked != own:
                log.info("site %s: the run config's %s is not used; this site's node config "
                         "names its own", self.site_name, key)
            return own
        if asked and not safe.fullmatch(asked):
            raise NodeConfigError(
                f"the run config sets {key} to a value that is not a model name; this site "
                f"loads model files only from its own node config. Set {key}=... in the node "
                "config (the coordinator checks the result through the frozen-part fingerprint).",
                reason="model-source")
        return asked


def _check_keys(node_config: Mapping[str, Any]) -> None:
    unknown = sorted(set(node_config) - set(NODE_KEYS) - set(NODE_KEYS_FLOWER))
    if unknown:
        raise NodeConfigError(
            f"Unknown node config key(s) {unknown}; known: {sorted(NODE_KEYS)}. Example: "
            "fedfusion node --node-config \"manifest='/data/site/manifest.csv' "
            "state-dir='/var/lib/fedfusion' policy='/etc/fedfusion/policy.toml'\".")


def _text(node_config: Mapping[str, Any], key: str) -> str | None:
    value = node_config.get(key)
    return None if value is None else str(value)
