"""Cached frozen features: a site runs the frozen front of each encoder once, not every epoch.

The frozen front is everything before the first trainable part: for the image encoder the stem
and the frozen ResNet stages, for the text encoder the embeddings and the frozen transformer
layers. Its output depends only on the inputs and the frozen weights, so a site computes it once
per `CacheKey` (dataset version, frozen fingerprint, trainable-layer config, image size, text
length) and trains the rest (`CachedFusion`: the trainable encoder tops + fusion + head) on the
stored outputs in every later epoch and round. Any change of a key field computes afresh.

Exact by construction: the same modules run on the same tensors in the same order (the frozen
front is in eval mode in both paths and draws no random numbers), so losses and per-sample
gradients, with or without DP, equal those of the full model (tests/test_feature_cache.py).
Tokens are cached, not pooled features, because `attention` fusion attends over every token;
that costs memory (`FeatureSet.nbytes`; measured in benchmarks/feature_cache.py). A site also
keeps its sets on disk in its state folder (owner-only files), so a restarted node is warm at once.

The cache assumes the inputs are the same every epoch. A dataset that augments (draws fresh
random inputs per epoch) must say so with a true `augments` attribute: it is then never cached.
Set `feature-cache = false` in the run config to turn the cache off altogether.

Structured fields (`tabular-fields`) have no frozen front: a feature set keeps their input
tensors beside the frozen outputs, and the tabular encoder runs in every epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import ModelConfig
from common.data.dataset import Case
from common.data.tabular import TABULAR_KEYS
from common.errors import ConfigurationError
from common.model.encoders import IMAGE_STAGES, text_layers
from common.model.fusion import Features
from common.model.fusion_model import FusionModel

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 4 * 1024**3  # per process; least recently used sets are dropped beyond it
FEATURE_BATCH = 64  # examples per forward pass while filling the cache
FEATURE_KEYS = ("image_front", "text_front", "attention_mask", "has_image", "has_text", "labels")


@dataclass(frozen=True, kw_only=True)
class CacheKey:
    """Everything the frozen outputs depend on; a change in any field computes them afresh."""

    dataset_sha256: str  # the dataset version
    split: str  # "train" or "val"
    frozen_fingerprint: str  # SHA-256 of the frozen weights
    trainable_image_blocks: int
    trained_text_layers: int  # trained in full or through LoRA adapters: the front stops below them
    image_size: int
    max_text_length: int
    tabular_fields: str = ""  # the schema of the fields a set carries ("": none)

    @classmethod
    def for_model(
        cls, config: ModelConfig, *, dataset_sha256: str, split: str, frozen_fingerprint: str
    ) -> CacheKey:
        """The key of `split` of a dataset version for a model built from `config`."""
        return cls(
            dataset_sha256=dataset_sha256,
            split=split,
            frozen_fingerprint=frozen_fingerprint,
            trainable_image_blocks=config.trainable_image_blocks,
            trained_text_layers=config.trained_text_layers,
            image_size=config.image_size,
            max_text_length=config.max_text_length,
            tabular_fields=config.tabular_fields,
        )

    def digest(self) -> str:
        """A short stable name for this key (the on-disk file name)."""
        # without fields, the name of a two-modality set as before they existed
        items = sorted((k, v) for k, v in asdict(self).items() if v != "" or k != "tabular_fields")
        text = "|".join(f"{k}={v}" for k, v in items)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- the split of each encoder into a frozen front and a trainable rest --------------------


class _BertFamily(Protocol):
    """What the frozen text front uses of a BERT-family encoder (transformers' BertModel): its
    embeddings and the attention mask its layers take."""

    embeddings: nn.Module

    def _create_attention_masks(
        self,
        attention_mask: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        embedding_output: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        cache: None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


def _bert(model: FusionModel) -> _BertFamily:
    # nn.Module types every attribute it looks up as Tensor | Module; the text encoder is a
    # BERT-family model by construction (build_text_encoder), and the cache needs one
    return cast(_BertFamily, model.text)


def check_front_frozen(model: FusionModel) -> None:
    """The stem and the text embeddings must be frozen, or there is no frozen front to cache."""
    stem = [
        *model.image.conv1.parameters(),
        *model.image.bn1.parameters(),
        *_bert(model).embeddings.parameters(),
    ]
    if any(p.requires_grad for p in stem):
        raise ConfigurationError(
            "The image stem or the text embeddings are trainable, so no frozen "
            "front can be cached. Set feature-cache = false."
        )


def image_front(model: FusionModel, images: torch.Tensor, start: int) -> torch.Tensor:
    """Stem + frozen stages: (B, 3, H, W) -> (B, C, h, w), the input of stage `start`."""
    enc = model.image
    x: torch.Tensor = enc.maxpool(torch.relu(enc.bn1(enc.conv1(images))))
    for stage in IMAGE_STAGES[:start]:
        x = getattr(enc, stage)(x)
    return x


def image_rest(model: FusionModel, x: torch.Tensor, start: int) -> torch.Tensor:
    """Trainable stages from `start`: (B, C, h, w) -> tokens (B, Ni, Di), as ImageEncoder does."""
    for stage in IMAGE_STAGES[start:]:
        x = getattr(model.image, stage)(x)
    return x.flatten(2).transpose(1, 2)  # (B, h*w, C)


def _text_mask(
    model: FusionModel, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor | None:
    # the mask the BERT model builds from the embeddings' output (depends on shape and dtype only)
    return _bert(model)._create_attention_masks(
        attention_mask=attention_mask,
        encoder_attention_mask=None,
        embedding_output=hidden,
        encoder_hidden_states=None,
        cache=None,
    )[0]


def text_front(
    model: FusionModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Embeddings + frozen layers: (B, T) ids -> hidden states (B, T, Dt) before layer `start`."""
    hidden: torch.Tensor = _bert(model).embeddings(input_ids=input_ids)  # (B, T, Dt)
    mask = _text_mask(model, hidden, attention_mask)
    for layer in text_layers(model.text)[:start]:
        hidden = layer(hidden, mask)
    return hidden


def text_rest(
    model: FusionModel, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Trainable layers from `start`: (B, T, Dt) -> last hidden state (B, T, Dt)."""
    mask = _text_mask(model, hidden, attention_mask)
    for layer in text_layers(model.text)[start:]:
        hidden = layer(hidden, mask)
    return hidden


class CachedFusion(nn.Module):
    """The fusion model from cached frozen outputs: trainable encoder tops + fusion + head.

    It holds the same module objects as `model` (no copy): training it trains `model`. The split
    comes from the run config's trainable-set sizes (part of the CacheKey), not from which
    parameters happen to be trainable this round, so cached outputs always fit it.
    """

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        check_front_frozen(model)
        self.model = model
        cfg = model.config
        self.image_start = len(IMAGE_STAGES) - cfg.trainable_image_blocks
        self.text_start = len(text_layers(model.text)) - cfg.trained_text_layers
        front = [
            *(getattr(model.image, s) for s in IMAGE_STAGES[: self.image_start]),
            *text_layers(model.text)[: self.text_start],
        ]
        if any(p.requires_grad for m in front for p in m.parameters()):
            raise ConfigurationError(
                "A parameter in front of the configured trainable blocks is "
                "trainable, so the frozen front cannot be cached. Set "
                "feature-cache = false."
            )

    def forward(
        self,
        image_front: torch.Tensor,  # (B, C, h, w)
        text_front: torch.Tensor,  # (B, T, Dt)
        attention_mask: torch.Tensor,  # (B, T)
        has_image: torch.Tensor,  # (B,) bool
        has_text: torch.Tensor,  # (B,) bool
        **tabular: torch.Tensor,  # the structured fields' inputs (TABULAR_KEYS), when declared
    ) -> torch.Tensor:
        m = self.model
        image_tokens = image_rest(m, image_front, self.image_start)  # (B, Ni, Di)
        text_tokens = text_rest(m, text_front, attention_mask, self.text_start)  # (B, T, Dt)
        features = Features(image_tokens, text_tokens, attention_mask.bool(), has_image, has_text)
        features = m.with_tabular(features, tabular)
        logits: torch.Tensor = m.head(m.fusion(features))  # (B, num_classes)
        return logits


# --- the cached outputs ---------------------------------------------------------------------


class FeatureSet(Dataset[Case]):
    """Cached frozen outputs of a dataset: item i is a dict with the keys of FEATURE_KEYS (and
    the structured fields' TABULAR_KEYS when declared)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) not in (set(FEATURE_KEYS), {*FEATURE_KEYS, *TABULAR_KEYS}):
            raise ValueError(
                f"A feature set needs exactly the tensors {FEATURE_KEYS} (and {TABULAR_KEYS} "
                f"with structured fields), got {sorted(tensors)}."
            )
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@torch.no_grad()
def compute_features(net: CachedFusion, dataset: Dataset[Case], device: torch.device) -> FeatureSet:
    """Run the frozen fronts of `net` once over `dataset` (in order); restores the model's mode."""
    model, wrapper = net.model, net
    was_training = model.training
    model.train()  # the frozen front is in eval mode exactly as during training
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_KEYS}
    if model.tabular is not None:
        parts |= {k: [] for k in TABULAR_KEYS}
    try:
        for batch in DataLoader(dataset, batch_size=FEATURE_BATCH, shuffle=False):
            b = {k: v.to(device) for k, v in batch.items()}
            parts["image_front"].append(image_front(model, b["images"], wrapper.image_start).cpu())
            parts["text_front"].append(
                text_front(model, b["input_ids"], b["attention_mask"], wrapper.text_start).cpu()
            )
            for k in parts.keys() - {"image_front", "text_front"}:
                parts[k].append(batch[k])
    finally:
        model.train(was_training)
    return FeatureSet({k: torch.cat(v) for k, v in parts.items()})


def save_features(features: FeatureSet, path: Path) -> None:
    """Write a feature set, readable by its owner only (written to a temporary name, renamed).

    Frozen features are derived from patient data: they get the protection of the data itself.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in features.tensors.items()}, str(tmp))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def load_features(path: Path) -> FeatureSet:
    """Read a feature set written by `save_features`."""
    return FeatureSet(load_file(str(path)))


class FeatureCache:
    """Feature sets by key, in memory (least recently used dropped beyond `max_bytes`).

    With `disk_dir`, each set is also kept on disk (one file per split: a new version replaces
    the old), so a restarted process reads it instead of computing it again.
    """

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES, disk_dir: Path | None = None) -> None:
        self.max_bytes, self.disk_dir = max_bytes, disk_dir
        self._sets: OrderedDict[CacheKey, FeatureSet] = OrderedDict()
        self.hits = self.misses = 0

    def get(
        self, key: CacheKey, model: FusionModel, dataset: Dataset[Case], device: torch.device
    ) -> FeatureSet:
        """The cached outputs for `key`, computed (or read from the disk cache) on a miss."""
        if getattr(dataset, "augments", False):
            raise ConfigurationError(
                "This dataset augments its inputs, so frozen outputs differ per "
                "epoch and cannot be cached. Set feature-cache = false."
            )
        if key in self._sets:
            self.hits += 1
            self._sets.move_to_end(key)
            return self._sets[key]
        self.misses += 1
        start = time.perf_counter()
        path = self.disk_dir / f"{key.split}-{key.digest()}.safetensors" if self.disk_dir else None
        if path is not None and path.is_file():
            features, source = load_features(path), "read from disk"
        else:
            features, source = compute_features(CachedFusion(model), dataset, device), "computed"
            if path is not None:
                save_features(features, path)
                for old in path.parent.glob(f"{key.split}-*.safetensors"):
                    if old != path:  # an earlier version of the data or the model
                        old.unlink(missing_ok=True)
        log.info(
            "feature cache: %d examples (%.1f MB) for %s %s in %.1f s",
            len(features),
            features.nbytes / 1e6,
            key.split,
            source,
            time.perf_counter() - start,
        )
        self._sets[key] = features
        while len(self._sets) > 1 and sum(f.nbytes for f in self._sets.values()) > self.max_bytes:
            self._sets.popitem(last=False)
        return features

    def clear(self) -> None:
        """Drop every cached set."""
        self._sets.clear()

    def only(self) -> FeatureSet:
        """The one cached set (for measurements of a cache holding exactly one)."""
        (features,) = self._sets.values()
        return features
