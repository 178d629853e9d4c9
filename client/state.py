"""What a site keeps warm between rounds in one process: its model, its data, its feature cache.

Every site has its own `SiteState`: its own model object (never shared with another site, so a
round at one site cannot disturb a round at another), its checked and tokenised data, and its
frozen-feature cache. Each piece is rebuilt when what shapes it changes: the model when the
model config does; the data when the rows' content or the data settings do (the version is
recomputed from the rows' content every round, so a change is always noticed). `SiteStates`
holds the states of the sites a process serves, the least recently used dropped beyond a bound.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from client.site_config import SiteConfig
from common.config import ModelConfig, RunConfig
from common.data.dataset import ManifestDataset
from common.data.manifest import Row, read_manifest, split_by_patient
from common.data.version import ImageDigests, dataset_version, record_keys
from common.errors import BadData
from common.model.encoders import load_tokenizer
from common.model.feature_cache import FeatureCache
from common.model.fusion_model import FusionModel, build_model
from common.model.modalities import Combo, modality_combos
from common.model.trainable import frozen_fingerprint

log = logging.getLogger(__name__)

FEATURES_FOLDER = "features"  # in the state folder: frozen features, owner-only
MAX_WARM_SITES = 8  # per process: a simulation's worker may serve many simulated hospitals


@dataclass(frozen=True, kw_only=True)
class ModelBundle:
    """A built model, its tokenizer and the fingerprint of its frozen part."""

    config: ModelConfig
    model: FusionModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    @classmethod
    def build(cls, config: ModelConfig) -> ModelBundle:
        """Build the model, load its tokenizer, fingerprint its frozen part (seconds)."""
        model = build_model(config)
        return cls(
            config=config,
            model=model,
            tokenizer=load_tokenizer(config.text_encoder),
            fingerprint=frozen_fingerprint(model),
        )


@dataclass(frozen=True, kw_only=True)
class SiteData:
    """A site's checked data, split by patient."""

    manifest: Path  # the manifest file read
    version: str  # the dataset version: a digest of the rows' content (common.data.version)
    record_keys: frozenset[
        str
    ]  # what identifies its records across versions (the budget follows them)
    train: ManifestDataset
    val: ManifestDataset
    train_combos: frozenset[Combo]  # the (has_image, has_text) combinations of the training rows


def _data_key(site: SiteConfig, run: RunConfig) -> tuple[object, ...]:
    """The settings that shape a site's datasets."""
    m = run.model
    return (
        m.class_names,
        m.text_encoder,
        m.image_size,
        m.max_text_length,
        m.tabular_fields,
        site.val_fraction,
        site.split_seed,
    )


class SiteState:
    """One site's warm state in this process (see the module docstring)."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.features = FeatureCache(disk_dir=site.state_dir / FEATURES_FOLDER)
        self.images = ImageDigests()  # the image files' digests, for the dataset version
        self.lock = threading.Lock()  # one round at a time per site and process
        self._bundle: ModelBundle | None = None
        self._data: tuple[tuple[object, ...], SiteData] | None = None

    def bundle(self, config: ModelConfig) -> ModelBundle:
        """This site's model for `config` (built on first use and when the config changes)."""
        if self._bundle is None or self._bundle.config != config:
            self._bundle = ModelBundle.build(config)
            self.features.clear()
        return self._bundle

    def data(self, run: RunConfig) -> SiteData:
        """This site's checked, split and tokenised data (re-read if the rows' content changes)."""
        manifest, rows = read_manifest(
            self.site.manifest, run.model.class_names, fields=run.model.tabular
        )
        version = dataset_version(rows, self.images)
        key = (*_data_key(self.site, run), version)
        if self._data is None or self._data[0] != key:
            self._data = (key, self._split(run, manifest, rows, version))
        return self._data[1]

    def _split(self, run: RunConfig, manifest: Path, rows: list[Row], version: str) -> SiteData:
        train_rows, val_rows = split_by_patient(rows, self.site.val_fraction, self.site.split_seed)
        if not train_rows:
            raise BadData(
                f"no training rows left after the validation split of {manifest}.",
                reason="no-training-rows",
            )
        tokenizer, m = self.bundle(run.model).tokenizer, run.model

        def dataset(part: list[Row]) -> ManifestDataset:
            return ManifestDataset(
                manifest,
                part,
                m.class_names,
                tokenizer,
                m.image_size,
                m.max_text_length,
                fields=m.tabular,
            )

        log.info(
            "site %s: %d train / %d val rows from %s",
            self.site.site_name,
            len(train_rows),
            len(val_rows),
            manifest,
        )
        return SiteData(
            manifest=manifest,
            version=version,
            record_keys=record_keys(rows, self.images),
            train=dataset(train_rows),
            val=dataset(val_rows),
            train_combos=modality_combos(train_rows),
        )


class SiteStates:
    """The warm states of the sites this process serves, keyed by site (LRU beyond `max_sites`)."""

    def __init__(self, max_sites: int = MAX_WARM_SITES) -> None:
        self.max_sites = max_sites
        self._states: OrderedDict[SiteConfig, SiteState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, site: SiteConfig) -> SiteState:
        """The state of `site`, created on first use."""
        with self._lock:
            state = self._states.get(site)
            if state is None:
                state = self._states[site] = SiteState(site)
                while len(self._states) > self.max_sites:
                    self._states.popitem(last=False)
            self._states.move_to_end(site)
            return state
