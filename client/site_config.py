"""What a hospital knows about itself: its data, name, state folder and privacy policy.

These facts come from the node's own configuration (`flower-supernode --node-config`), never
from the coordinator. In a simulation Flower sets only `partition-id`, which maps to the simulated
hospital's folder `<data-root>/hospital-<i>/` (`data-root` and `state-root` are simulation-only run
config keys, inert at a deployed node: it always has its own `manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DataConfig
from common.errors import ConfigurationError

NODE_KEYS_FLOWER = ("partition-id", "num-partitions")  # set by Flower's simulation runtime
NODE_KEYS = ("manifest", "site-name", "state-dir", "policy")
POLICY_FILE = "policy.toml"  # a simulated hospital's policy, when its folder has one
STATE_FOLDER = "state"


class NodeConfigError(ConfigurationError):
    """The node's own configuration is incomplete or unknown."""

    default_reason = "node-config"


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One hospital's own facts: its name, data, state folder and policy file."""

    site_name: str
    manifest: Path
    state_dir: Path
    policy: Path | None = None  # None: the default policy (common.privacy.policy)
    simulated: bool = False  # a simulated hospital: the researcher plays it (its default policy)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], data: DataConfig) -> SiteConfig:
        """Deployment: `manifest`, `state-dir` (and optional `site-name`, `policy`) from --node-config.

        Simulation: Flower sets only `partition-id`, which maps to `<data-root>/hospital-<i>`;
        the hospital's policy is `policy.toml` in that folder if present, and its state folder is
        `<state-root or data-root>/hospital-<i>/state`.
        """
        unknown = sorted(set(node_config) - set(NODE_KEYS) - set(NODE_KEYS_FLOWER))
        if unknown:
            raise NodeConfigError(
                f"Unknown node config key(s) {unknown}; known: {sorted(NODE_KEYS)}. Example: "
                "flower-supernode --node-config \"manifest='/data/site/manifest.csv' "
                "state-dir='/var/lib/fedfusion' policy='/etc/fedfusion/policy.toml'\".")
        policy = node_config.get("policy")
        if "manifest" in node_config:
            return cls._deployed(node_config, policy)
        if "partition-id" in node_config:
            name = f"hospital-{int(node_config['partition-id'])}"
            folder = Path(data.data_root).expanduser() / name
            state_root = Path(data.state_root or data.data_root).expanduser()
            if not policy and (folder / POLICY_FILE).is_file():
                policy = folder / POLICY_FILE
            return cls(site_name=str(node_config.get("site-name") or name), manifest=folder,
                       state_dir=state_root / name / STATE_FOLDER,
                       policy=Path(str(policy)) if policy else None, simulated=True)
        raise NodeConfigError(
            "This node has no data: set its manifest with "
            "flower-supernode --node-config \"manifest='/path/to/manifest.csv' state-dir=...\".")

    @classmethod
    def _deployed(cls, node_config: Mapping[str, Any], policy: Any) -> SiteConfig:
        if "state-dir" not in node_config:
            raise NodeConfigError(
                "This node has no state-dir: the site keeps its privacy ledger there, so that "
                "a restart cannot reset what it has spent. Add state-dir='/a/private/folder' "
                "to --node-config.")
        manifest = Path(str(node_config["manifest"])).expanduser()
        folder = manifest if manifest.is_dir() else manifest.parent
        return cls(site_name=str(node_config.get("site-name") or folder.resolve().name),
                   manifest=manifest, state_dir=Path(str(node_config["state-dir"])).expanduser(),
                   policy=Path(str(policy)).expanduser() if policy else None)
