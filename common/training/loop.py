"""One local training loop and one evaluation loop, shared by sites, tests and benchmarks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.errors import BadData, Failure
from common.training.metrics import Metrics, classification_metrics
from common.training.progress import batches, log_line, progress, show_loss

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What one call of `train` did."""

    loss: float  # mean cross-entropy per example over all local steps
    examples_seen: int
    steps: int
    seconds: float


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` / `cuda:N` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise Failure(
            f"device is {name!r} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s); set device to 'cpu', 'auto' or an existing cuda:N.",
            reason="device",
        )
    return device


def forward_batch(
    model: nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and labels (B,) of one batch; every other key of the batch is a model input.

    (A FusionModel takes `images`, `input_ids`, ...; a CachedFusion the cached frozen outputs.)
    """
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = b.pop("labels")
    return model(**b), labels


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
    desc: str = "train",
) -> TrainResult:
    """Run `epochs` passes over `loader`; `criterion` must average over the batch.

    `clip_grad_norm` clips the batch gradient (without DP; DP-SGD clips per sample itself).
    `proximal_mu` > 0 adds FedProx's pull toward the starting parameters w0 as a decoupled step
    after each optimizer step, w <- w - lr * mu * (w - w0): it depends on no example, so it sits
    outside DP-SGD's clipping and noise, as weight decay would.
    `desc` names the progress bar (or the log lines when no terminal is attached).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    start, loss_sum, seen, steps = time.perf_counter(), 0.0, 0, 0
    for epoch in range(1, epochs + 1):
        bar = progress(loader, desc=f"{desc} epoch {epoch}/{epochs}", total=batches(loader))
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            logits, labels = forward_batch(model, batch, device)
            loss = criterion(logits, labels)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves backward unannotated
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()  # also on an empty Poisson batch: DP noise and accounting still apply
            if anchor:
                _proximal_step(params, anchor, optimizer.param_groups[0]["lr"] * proximal_mu)
            steps += 1
            if labels.numel():
                loss_sum += float(loss.item()) * labels.numel()
                seen += labels.numel()
                show_loss(bar, loss_sum / seen)
        log_line(
            log,
            "%s epoch %d/%d: %d steps, mean loss %.4f, %.1f s",
            desc,
            epoch,
            epochs,
            steps,
            loss_sum / max(seen, 1),
            time.perf_counter() - start,
        )
    return TrainResult(
        loss=loss_sum / max(seen, 1),
        examples_seen=seen,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _proximal_step(
    params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rate: float
) -> None:
    for p, p0 in zip(params, anchor, strict=True):
        p.sub_(p - p0, alpha=rate)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable[Batch], device: torch.device, desc: str = "evaluate"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and labels (N,) over `loader`, on the CPU (labels are -1 where unknown)."""
    model.eval()
    logits_all, labels_all = [], []
    for batch in progress(loader, desc=desc, total=batches(loader)):
        logits, labels = forward_batch(model, batch, device)
        logits_all.append(logits.float().cpu())
        labels_all.append(labels.cpu())
    if not logits_all:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits_all), torch.cat(labels_all)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> Metrics:
    """Loss, accuracy, macro AUROC and F1 from logits (N, C) and integer labels (N,)."""
    if not len(labels):
        return classification_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 1)), 0.0)
    loss_sum = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    probs = torch.softmax(logits, dim=-1).numpy()
    return classification_metrics(labels.numpy(), probs, loss_sum)


def evaluate(
    model: nn.Module, loader: Iterable[Batch], device: torch.device, desc: str = "evaluate"
) -> Metrics:
    """Loss, accuracy, macro AUROC and F1 of the model on `loader`."""
    start = time.perf_counter()
    metrics = metrics_from_logits(*predict_logits(model, loader, device, desc))
    log_line(
        log,
        "%s: %d examples, loss %.4f, accuracy %.3f, %.1f s",
        desc,
        metrics.num_examples,
        metrics.loss,
        metrics.accuracy,
        time.perf_counter() - start,
    )
    return metrics


class FixedSteps:
    """Exactly `steps` batches of `loader` per pass, starting it again as often as needed.

    A round of `local-steps` steps: a small site cycles its data several times, a large one sees
    part of it (each pass of a Poisson loader is a fresh sample at the same rate).
    """

    def __init__(self, loader: Iterable[Batch], steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        left = self.steps
        while left > 0:
            yielded = 0
            for batch in self.loader:
                yield batch
                yielded += 1
                left -= 1
                if left == 0:
                    return
            if not yielded:
                raise BadData("the training loader yielded no batch.", reason="no-training-rows")
