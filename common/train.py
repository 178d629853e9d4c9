"""One local training loop and one evaluation loop, shared by sites, tests and benchmarks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.metrics import Metrics, classification_metrics

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train` did."""

    loss: float  # mean cross-entropy per example over all local steps
    examples_seen: int
    steps: int
    seconds: float


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)


def forward_batch(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and labels (B,) of one batch."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    logits = model(b["images"], b["input_ids"], b["attention_mask"], b["has_image"], b["has_text"])
    return logits, b["labels"]


def train(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    device: torch.device,
    clip_grad_norm: float | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run `epochs` passes over `loader`; `criterion` must average over the batch.

    `clip_grad_norm` clips the batch gradient (without DP; DP-SGD clips per sample itself).
    `proximal_mu` > 0 adds FedProx's pull toward the starting parameters w0 as a decoupled step
    after each optimizer step, w <- w - lr * mu * (w - w0): it depends on no example, so it sits
    outside DP-SGD's clipping and noise, as weight decay would.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    start, loss_sum, seen, steps = time.perf_counter(), 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            logits, labels = forward_batch(model, batch, device)
            loss = criterion(logits, labels)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()  # also on an empty Poisson batch: DP noise and accounting still apply
            if anchor:
                _proximal_step(params, anchor, optimizer.param_groups[0]["lr"] * proximal_mu)
            steps += 1
            if labels.numel():
                loss_sum += float(loss.item()) * labels.numel()
                seen += labels.numel()
    return TrainResult(loss_sum / max(seen, 1), seen, steps, time.perf_counter() - start)


@torch.no_grad()
def _proximal_step(params: list[torch.Tensor], anchor: list[torch.Tensor], rate: float) -> None:
    for p, p0 in zip(params, anchor, strict=True):
        p.sub_(p - p0, alpha=rate)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device) -> Metrics:
    """Loss, accuracy, macro AUROC and F1 of the model on `loader`."""
    model.eval()
    labels_all, probs_all, loss_sum = [], [], 0.0
    for batch in loader:
        logits, labels = forward_batch(model, batch, device)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        probs_all.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    if not labels_all:
        return classification_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 1)), 0.0)
    return classification_metrics(np.concatenate(labels_all), np.concatenate(probs_all), loss_sum)
