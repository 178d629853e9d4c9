"""Distributed DP under secure aggregation: one noisy DP-FedSGD step per exchange.

With local DP each site adds the whole noise to its own update. Under secure aggregation the
coordinator sees only the cohort's sum, so each of the sites adds a share of the noise and the sum
carries all of it (Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism";
Agarwal et al. 2021). Several local steps between exchanges would leave every step but the last
un-noised in the sum, so the design takes **one noisy step per exchange** (DP-FedSGD):

1. site j Poisson-samples its training rows at rate q_j (a secret, OS-seeded draw), computes the
   per-sample gradients of the trainable parameters, clips each sample's gradient jointly over
   all of them to L2 norm C and sums them (`clipped_gradient_sum`);
2. it quantizes the sum to integers at scale s by unbiased stochastic rounding
   (`common.secagg.vector.pack`) and adds its noise share: a discrete Gaussian of variance
   (z Delta)^2 / d (`DistributedNoise`), d being how many honest shares the sum is guaranteed
   to hold (at least the sites that are not assumed to collude with the coordinator);
3. secure aggregation (`common.secagg`) reveals the sum of the sites' vectors; the coordinator
   divides it by the expected batch sum_j q_j N_j and takes a server SGD step (`server_step`).

Sensitivity. Adding or removing one row of site j moves its clipped sum by at most C in L2, so
s C after scaling. Couple the stochastic rounding of two neighbouring sums through the same
uniforms: each coordinate's rounded difference is the scaled difference plus less than 1, so the
integer vectors differ by at most Delta = s C + sqrt(D) for D coordinates. The released sum is
then, for each row of site j, a Poisson-subsampled (rate q_j) Gaussian-like mechanism of noise
multiplier z (noise std z Delta against sensitivity Delta; a mixture over the rounding's
randomness, which only helps), accounted by the existing accountant (`ddp_epsilon`,
`common.privacy.accounting`). Two approximations, both negligible at the share variances used
here (a share's std is in the thousands of integer units): the sum of d discrete Gaussians is
close to, not exactly, a discrete Gaussian (Kairouz et al. 2021, Thm. 1, a divergence of order
exp(-2 pi^2 sigma_share^2)), and each share is truncated at `noise_bound` = 14 standard deviations
(probability about 1e-44 per coordinate) so that the ring's headroom is known.

If every other site colluded with the coordinator (or added nothing), a site's released value
would carry only its own share: the guarantee then falls to noise multiplier
`DistributedNoise.fallback_multiplier` (z / sqrt(d)), which a site may account as its worst case.

Core module: no Flower import. The secure aggregation's wiring is `common.secagg`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from common.errors import ConfigurationError
from common.model.feature_cache import CachedFusion
from common.privacy.accounting import MAX_NOISE_MULTIPLIER, epsilon_from_history
from common.privacy.dpsgd import FiniteCrossEntropy
from common.secagg.noise import discrete_gaussian, secure_generator
from common.secagg.params import MAX_BITS, MAX_COHORT, MAX_COORDINATES, MIN_BITS
from common.training.loop import forward_batch

NOISE_BOUND_STDS = 14  # a share is resampled beyond this many standard deviations (p ~ 1e-44)
GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the modes that give per-sample gradients
CHUNK = 256  # sampled rows per forward/backward pass (memory; the sum does not depend on it)
MAX_SHARE_VARIANCE = 2.0**60  # what common.secagg.noise samples


@dataclass(frozen=True)
class GradientSum:
    """A site's sum of per-sample clipped gradients over one Poisson sample.

    `sums` is keyed like `trainable_state` of the site's model (a CachedFusion's parameters under
    its FusionModel's names) and holds exactly the parameters trainable at the call.
    """

    sums: dict[str, torch.Tensor]  # name -> sum over the sampled rows (CPU, float32)
    sampled: int  # rows in the Poisson sample: private, it stays at the site (the coordinator
    # divides by the public expected batch)
    non_finite: int = 0  # sampled rows whose logits or gradient were not finite: contributed 0


def poisson_sample(
    size: int, *, sample_rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (int64) of the rows drawn, each independently with probability `sample_rate`.

    Without `generator` the draw is secret: a numpy generator seeded with 256 bits of the
    operating system's entropy (a coordinator that knew the seed would know who was sampled).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], not {sample_rate}")
    if generator is None:
        uniforms = torch.from_numpy(secure_generator().random(size))
    else:
        uniforms = torch.rand(size, generator=generator, dtype=torch.float64)
    return torch.nonzero(uniforms < sample_rate).flatten()


def _named_trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the trainable parameters under the names `trainable_state` gives:
    a CachedFusion's are its FusionModel's (the same parameter objects)."""
    base = net.model if isinstance(net, CachedFusion) else net
    assert isinstance(base, nn.Module)
    return [(name, p) for name, p in base.named_parameters() if p.requires_grad]


def clipped_gradient_sum(
    net: nn.Module,
    dataset: Dataset[Any],
    *,
    sample_rate: float,
    max_grad_norm: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    grad_sample_mode: str = "hooks",
) -> GradientSum:
    """Poisson-sample `dataset`, clip each sampled row's gradient to `max_grad_norm`, sum them.

    `net` is what trains (a FusionModel on a ManifestDataset, or a CachedFusion on a FeatureSet
    of its cached frozen outputs): its batches are fed as `common.training.loop` feeds them. The
    per-sample gradients are Opacus' (`grad_sample_mode` "hooks" or "functorch"), of the
    parameters that require a gradient (freeze the untrained ones with
    `common.model.modalities.frozen` around the call); each row's is clipped jointly over all
    of them, C / max(norm, C). A row whose logits or gradient is not finite contributes exactly
    zero (as in `common.privacy.dpsgd`), so every row's contribution has norm at most C whatever
    the model. The sum is a pure function of the data and the sample: no noise is added here.
    Afterwards every parameter's `.grad` and `.grad_sample` are None.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigurationError(
            f"grad-sample-mode {grad_sample_mode!r} gives no per-sample gradients; distributed "
            f"DP needs one of {GRAD_SAMPLE_MODES}"
        )
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be finite and positive, not {max_grad_norm}")
    named = _named_trainable(net)
    if not named:
        raise ConfigurationError("the model has no trainable parameter to take a gradient of")
    sums = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in named}
    index = poisson_sample(len(dataset), sample_rate=sample_rate, generator=generator)  # type: ignore[arg-type]
    if not len(index):
        return GradientSum(sums=sums, sampled=0)
    # imported here: Opacus is heavy, and only a training site needs it
    from opacus.grad_sample.utils import prepare_module

    params = [p for _, p in named]
    was_training = net.training
    net.train()  # as DP-SGD computes its gradients (a frozen front stays in eval mode)
    hooks = prepare_module(
        net, grad_sample_mode, False, batch_first=True, loss_reduction="sum", strict=True
    )
    criterion = FiniteCrossEntropy(reduction="sum")
    non_finite = 0
    try:
        subset = Subset(dataset, index.tolist())
        for batch in DataLoader(subset, batch_size=CHUNK, shuffle=False):
            for p in params:
                p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
            logits, labels = forward_batch(net, batch, device)
            criterion(logits, labels).backward()
            rows = len(labels)
            per_sample = [_grad_sample(p, rows) for p in params]  # (B, ...) each
            flat = torch.cat([g.reshape(rows, -1) for g in per_sample], dim=1)  # (B, P)
            bad = ~torch.isfinite(flat).all(dim=1) | ~torch.isfinite(logits.detach()).all(dim=1)
            non_finite += int(bad.sum())
            flat = torch.where(bad[:, None], torch.zeros_like(flat), flat)
            norms = flat.norm(dim=1)  # (B,)
            factor = max_grad_norm / torch.clamp(norms, min=max_grad_norm)  # <= 1
            factor = torch.where(bad, torch.zeros_like(factor), factor)
            for (name, _), g in zip(named, per_sample, strict=True):
                g = torch.where(
                    bad.view(-1, *([1] * (g.dim() - 1))), torch.zeros_like(g), g
                )  # (B, ...)
                scaled = torch.einsum("b,b...->...", factor.to(g.dtype), g)
                sums[name] += scaled.detach().to("cpu", torch.float32)
    finally:
        hooks.cleanup()
        for p in params:
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
        net.train(was_training)
    return GradientSum(sums=sums, sampled=len(index), non_finite=non_finite)


def _grad_sample(p: nn.Parameter, rows: int) -> torch.Tensor:
    """The per-sample gradient Opacus attached to `p` ((rows, ...); zeros if it got none)."""
    g = getattr(p, "grad_sample", None)
    if g is None:  # the parameter took no part in this batch's loss
        return torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
    assert isinstance(g, torch.Tensor) and g.shape == (rows, *p.shape), "one row per sample"
    return g


@dataclass(frozen=True, kw_only=True)
class DistributedNoise:
    """One site's share of the distributed discrete Gaussian noise of a DP-FedSGD exchange.

    z: the noise multiplier the sum must carry; d: how many honest shares it is guaranteed to hold;
    C: the per-sample clipping norm; s: the quantization scale; D: the quantized coordinates.
    """

    noise_multiplier: float  # z
    shares: int  # d
    max_grad_norm: float  # C
    scale: float  # s
    coordinates: int  # D

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigurationError:
            return ConfigurationError(f"distributed DP noise: {what}")

        z, c, s = self.noise_multiplier, self.max_grad_norm, self.scale
        for name, value in (("noise_multiplier", z), ("max_grad_norm", c), ("scale", s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(f"{name} must be a number, not {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise bad(f"{name} must be finite and positive, not {value}")
        if z > MAX_NOISE_MULTIPLIER:
            raise bad(f"noise_multiplier {z} is above {MAX_NOISE_MULTIPLIER:g}")
        for name, count, most in (
            ("shares", self.shares, MAX_COHORT),
            ("coordinates", self.coordinates, MAX_COORDINATES),
        ):
            if type(count) is not int or not 1 <= count <= most:
                raise bad(f"{name} must be an integer in [1, {most}], not {count!r}")
        if not 1 <= self.share_variance <= MAX_SHARE_VARIANCE:
            raise bad(
                f"a share's variance {self.share_variance:.4g} is outside [1, 2**60]: choose a "
                "scale that makes the integer noise at least 1 and keeps it in 64 bits"
            )

    @property
    def sensitivity(self) -> float:
        """Delta = s C + sqrt(D): the L2 sensitivity of the quantized sum, in integer units."""
        return self.scale * self.max_grad_norm + math.sqrt(self.coordinates)

    @property
    def share_variance(self) -> float:
        """(z Delta)^2 / d: the variance of one site's share (d shares sum to (z Delta)^2)."""
        return (self.noise_multiplier * self.sensitivity) ** 2 / self.shares

    @property
    def noise_bound(self) -> int:
        """The largest |value| of a share per coordinate: ceil(14 standard deviations)."""
        return math.ceil(NOISE_BOUND_STDS * math.sqrt(self.share_variance))

    @property
    def fallback_multiplier(self) -> float:
        """z / sqrt(d): the noise multiplier of this site's own share alone (if every other
        share were missing: the others colluded with the coordinator or added nothing)."""
        return self.noise_multiplier / math.sqrt(self.shares)

    def sample(self, size: int, rng: np.random.Generator) -> NDArray[np.int64]:
        """`size` integers of this share: discrete Gaussian, values beyond the bound redrawn.

        `rng` must be secret (`common.secagg.noise.secure_generator`): a coordinator that knew
        it could subtract the noise.
        """
        out = discrete_gaussian(variance=self.share_variance, size=size, rng=rng)
        bound = self.noise_bound
        while True:
            beyond = np.abs(out) > bound
            if not beyond.any():
                return out
            out[beyond] = discrete_gaussian(
                variance=self.share_variance, size=int(beyond.sum()), rng=rng
            )


def choose_scale(*, max_grad_norm: float, coordinates: int, inflation: float = 0.01) -> float:
    """The quantization scale s at which rounding adds at most `inflation` to the sensitivity:
    sqrt(D) <= inflation * s * C, so Delta <= (1 + inflation) s C."""
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)) or coordinates < 1:
        raise ValueError("max_grad_norm must be finite and positive, coordinates at least 1")
    if not 0 < inflation <= 1:
        raise ValueError(f"inflation must be in (0, 1], not {inflation}")
    return math.sqrt(coordinates) / (inflation * max_grad_norm)


def ring_bits(
    *,
    sites: int,
    max_batch: int,
    max_grad_norm: float,
    scale: float,
    noise_bound: int,
    max_weight: int = 1,
) -> int:
    """The fewest ring bits at which the sum of `sites` vectors decodes without overflow.

    A site's quantized clipped sum has |coordinate| <= max_batch * C * s + 1 (its L2 norm is at
    most C per sampled row; `max_batch` bounds the rows sampled: the site's row count, or the
    clip its packing applies), plus its noise share (<= `noise_bound`); the ring must hold
    `sites` of them with a sign bit, as `common.secagg.params.RoundParams` checks (its clip
    being max_batch * C). At least 16 bits; more than 62 raises ConfigurationError.
    """
    if sites < 1 or max_batch < 1 or noise_bound < 0 or max_weight < 1:
        raise ValueError("sites, max_batch and max_weight must be >= 1, noise_bound >= 0")
    per_site = math.ceil(max_batch * max_grad_norm * scale) + 1 + noise_bound
    largest = sites * max(per_site, max_weight)
    bits = max(MIN_BITS, largest.bit_length() + 1)  # largest < 2**(bits - 1)
    if bits > MAX_BITS:
        raise ConfigurationError(
            f"{sites} sites of |value| <= {per_site} need a ring of {bits} bits; at most "
            f"{MAX_BITS} fit the 64-bit vectors. Lower the quantization scale (a larger "
            "inflation in choose_scale), the sampled batch bound or the noise multiplier, or "
            "aggregate fewer sites per round"
        )
    return bits


def server_step(
    global_params: Mapping[str, NDArray[np.floating]],
    sums: Mapping[str, NDArray[np.floating]],
    *,
    expected_batch: float,
    learning_rate: float,
) -> dict[str, NDArray[np.floating]]:
    """theta - lr * sum / expected_batch per array; arrays absent from `sums` unchanged.

    `sums` is the noisy sum the secure aggregation revealed (dequantized); `expected_batch` is
    sum_j q_j N_j, public (not the realised batch, which would leak the sampled count).
    """
    if not (math.isfinite(expected_batch) and expected_batch > 0):
        raise ValueError(f"expected_batch must be finite and positive, not {expected_batch}")
    if not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be finite, not {learning_rate}")
    unknown = sorted(set(sums) - set(global_params))
    if unknown:
        raise ConfigurationError(f"the sum holds arrays {unknown[:5]} the model does not")
    out: dict[str, NDArray[np.floating]] = {}
    for name, theta in global_params.items():
        if name not in sums:
            out[name] = theta
            continue
        step = np.asarray(sums[name], dtype=np.float64) * (learning_rate / expected_batch)
        if step.shape != theta.shape:
            raise ConfigurationError(
                f"array {name!r}: the sum has shape {step.shape}, the model {theta.shape}"
            )
        out[name] = (theta - step).astype(theta.dtype)
    return out


def ddp_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of `steps` DP-FedSGD exchanges at a site sampling at `sample_rate`, when the
    aggregated sum carries noise multiplier z (`common.privacy.accounting`)."""
    return epsilon_from_history(
        [(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
    )
