"""Traffic: the bytes a site uploads per round against the bytes of the full fusion model.

Per preset and trainable-set option: fusion + head (the default), the top text layer and ResNet
stage as well, LoRA adapters on the text encoder (peft, rank 8, query + value) + fusion + head.
Bytes are the serialised ArrayRecord a reply carries (Flower's `Array` payloads: numpy .npy
bytes with their headers), in float32 and in a float16 transport (cast at the site, cast back
to float32 before screening; aggregation stays float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from benchmarks.record import Outcome
from benchmarks.workloads import bench_config
from common.model.encoders import text_layers
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import trainable_state

OPTIONS = {
    "fusion+head": {},
    "top-blocks": {"trainable_text_layers": 1, "trainable_image_blocks": 1},
    "lora-r8": {"lora_rank": 8},
}


def payload_bytes(state: dict[str, torch.Tensor], dtype: np.dtype) -> int:
    """Bytes of the ArrayRecord a site would send for `state` in `dtype`."""
    record = ArrayRecord({k: Array(v.numpy().astype(dtype)) for k, v in state.items()})
    return sum(len(a.data) for a in record.values())


def model_for(preset: str, option: dict[str, int]) -> FusionModel:
    """The preset's model with a trainable-set option applied (LoRA: on every text layer)."""
    if option.get("lora_rank"):
        depth = len(text_layers(build_model(bench_config(preset).model).text))
        option = {**option, "lora_layers": depth}
    return build_model(bench_config(preset, **option).model)


def run(quick: bool, work: Path) -> Outcome:
    """Count bytes for every preset and option; the key is seed / fusion + head / float32."""
    rows = []
    for preset in ("tiny", "demo", "seed"):
        full = None
        for option, settings in OPTIONS.items():
            model = model_for(preset, settings)
            if full is None:  # the full fusion model's state (parameters and buffers), float32
                full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            state = trainable_state(model)
            for dtype in ("float32", "float16"):
                sent = payload_bytes(state, np.dtype(dtype))
                rows.append(
                    {
                        "preset": preset,
                        "trainable_set": option,
                        "transport": dtype,
                        "parameters": sum(v.numel() for v in state.values()),
                        "upload_bytes": sent,
                        "full_model_bytes": full,
                        "reduction": full / sent,
                    }
                )
            del model
    key = next(
        r
        for r in rows
        if (r["preset"], r["trainable_set"], r["transport"]) == ("seed", "fusion+head", "float32")
    )
    return Outcome(
        key="upload_reduction_ratio",
        value=key["reduction"],
        target=">= 50",
        note="full fusion-model state bytes (float32) over the serialised update a site uploads, "
        "seed preset (ResNet-50 + BERT-base shape), default trainable set, float32 transport",
        settings={
            "presets": ["tiny", "demo", "seed"],
            "options": OPTIONS,
            "lora": "peft, rank 8, alpha 16, query + value of every text layer",
        },
        raw={"cases": rows},
    )
