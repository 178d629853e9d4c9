"""Which runs a hospital takes part in: the identity of a run's bundle, and the site's rule.

Whoever submits a run ships a bundle (a FAB: a zip of the app folder). The hospital's node never
runs code from it, but it takes part only in runs whose bundle the site accepts. The identity is
read from the bundle's bytes without installing or importing anything: its SHA-256, and the
publisher, name and version its pyproject.toml declares. The declared names are the submitter's
word (anyone can write `publisher = "fedfusion"`); the hash is not. The default rule accepts the
FedFusion app at the version installed at the hospital; a site that wants exactly the bundles
it has reviewed lists their hashes in its policy (`accept-bundles`), and may also name the only
run-config keys a run may set differently from its installed defaults (node config
`run-config-keys`).
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from common.config import default_user_config

APP_PUBLISHER, APP_NAME = "fedfusion", "fedfusion"
# Run-config keys a run may always set: the coordinator's own (naming, waiting, which nodes) and
# those inert at a deployed site (its data, state folder, device and split are its node config's).
FREE_KEYS = frozenset(
    {
        "run-name",
        "output-dir",
        "round-timeout",
        "min-nodes",
        "site-nodes",
        "data-root",
        "state-root",
        "device",
        "val-fraction",
    }
)


class BundleUnreadable(Exception):
    """The bundle's bytes are not a readable Flower app bundle."""


@dataclass(frozen=True, kw_only=True)
class BundleIdentity:
    """What a bundle is: its hash and what its pyproject.toml declares."""

    sha256: str
    publisher: str
    name: str
    version: str

    @property
    def label(self) -> str:
        """`publisher/name==version (sha256 prefix)`, for logs."""
        return f"{self.publisher}/{self.name}=={self.version} (sha256 {self.sha256[:12]})"

    @classmethod
    def of(cls, content: bytes) -> BundleIdentity:
        """Read the identity from a bundle's bytes (nothing is installed or run)."""
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as bundle:
                project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
            app = project["tool"]["flwr"]["app"]
            return cls(
                sha256=hashlib.sha256(content).hexdigest(),
                publisher=str(app["publisher"]),
                name=str(project["project"]["name"]),
                version=str(project["project"]["version"]),
            )
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise BundleUnreadable(f"not a Flower app bundle ({type(err).__name__})") from err


def installed_version() -> str:
    """The version of FedFusion installed at this site."""
    try:
        return version("fedfusion")
    except PackageNotFoundError:
        return "0+unknown"  # running from a checkout that was never installed


@dataclass(frozen=True, kw_only=True)
class AcceptanceRule:
    """The bundles this site takes part with: listed hashes, or the installed FedFusion app."""

    hashes: frozenset[str] = frozenset()  # non-empty: only these exact bundles
    version: str = ""  # "" = the installed version
    run_config_keys: frozenset[str] | None = None  # keys a run may set differently from the
    # defaults installed here (beside `FREE_KEYS`); None: any key

    def changed_keys(self, run_config: Mapping[str, Any]) -> list[str]:
        """The run-config keys this run sets differently from the installed defaults, and may not.

        A run's config is its bundle's defaults with the submitter's overrides; the bundle's
        ClientApp never runs here, but that config does. A site that pins bundle hashes pins the
        defaults it reviewed; `run-config-keys` also bounds what an override may change.
        """
        if self.run_config_keys is None:
            return []
        allowed, defaults = self.run_config_keys | FREE_KEYS, default_user_config()
        return sorted(
            str(k)
            for k in set(defaults) | set(run_config)
            if k not in allowed and run_config.get(k) != defaults.get(k)
        )

    def problem(
        self, bundle: BundleIdentity, *, declared_hash: str, declared_id: str, declared_version: str
    ) -> str | None:
        """Why this site does not take part in a run with `bundle`, or None when it does.

        `declared_*` are what the run says about its bundle (Flower's Run record); they must
        agree with the bundle's own bytes.
        """
        if declared_hash != bundle.sha256:
            return "the run's bundle hash does not match the bundle's bytes"
        if declared_id != f"{bundle.publisher}/{bundle.name}" or declared_version != bundle.version:
            return "the run's app id or version does not match the bundle's pyproject.toml"
        if self.hashes:
            return (
                None
                if bundle.sha256 in self.hashes
                else (f"bundle {bundle.label} is not in this site's accept-bundles list")
            )
        wanted = self.version or installed_version()
        if (bundle.publisher, bundle.name, bundle.version) != (APP_PUBLISHER, APP_NAME, wanted):
            return (
                f"bundle {bundle.label} is not the FedFusion app at this site's installed "
                f"version ({APP_PUBLISHER}/{APP_NAME}=={wanted})"
            )
        return None
