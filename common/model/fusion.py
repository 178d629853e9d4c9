"""Fusion of image and text features into one representation (B, fusion_dim).

Three modes:
- `concat`: concatenate the pooled features and apply one linear layer (the reference design).
- `weighted`: project each modality to a common size and sum with learned softmax weights,
  Z = sum_i w_i * phi(M_i).
- `attention`: each modality's pooled feature queries the tokens of both modalities
  (cross-modal multi-head attention).

A sample may lack a modality (`has_image` / `has_text` false). It is masked, never zero-filled
silently: `concat` substitutes a learned placeholder vector, `weighted` renormalises the weights
over the modalities present, `attention` hides the missing tokens from the keys and averages
only the present modalities' outputs.

Which rows can train which part: each fusion declares, per submodule, the rows whose gradient
reaches it (`REACHED_BY`: `image` / `text` = rows with that modality, `no-image` / `no-text` =
rows without it, `both` = rows with both); undeclared submodules are reached by every row.
`common.model.modalities` turns this into the parameters a site cannot train.

Learned vectors (placeholders, the weight logits) are 1-row `nn.Embedding` tables looked up with
index 0, so Opacus computes their per-sample gradients with its Embedding sampler.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigurationError


class Features(NamedTuple):
    """Encoder outputs for one batch."""

    image_tokens: torch.Tensor  # (B, Ni, Di)
    text_tokens: torch.Tensor  # (B, T, Dt)
    text_mask: torch.Tensor  # (B, T) bool, true for real tokens
    has_image: torch.Tensor  # (B,) bool
    has_text: torch.Tensor  # (B,) bool

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean image token (B, Di) and masked mean text token (B, Dt)."""
        return self.image_tokens.mean(dim=1), masked_mean(self.text_tokens, self.text_mask)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens (B, L, D) over positions where mask (B, L) is true -> (B, D)."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class LearnedVector(nn.Module):
    """A learned vector broadcast to the batch: (B,) -> (B, dim)."""

    def __init__(self, dim: int, init: str = "normal") -> None:
        super().__init__()
        self.table = nn.Embedding(1, dim)
        if init == "zeros":
            nn.init.zeros_(self.table.weight)
        else:
            nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        index = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        vectors: torch.Tensor = self.table(index)  # a module's call is typed Any
        return vectors


def _fill_missing(
    x: torch.Tensor, present: torch.Tensor, placeholder: LearnedVector
) -> torch.Tensor:
    """Replace rows of x (B, D) whose modality is absent by the learned placeholder."""
    return torch.where(present.unsqueeze(-1), x, placeholder(x))


class ConcatFusion(nn.Module):
    """Concatenate normalised pooled features, then Linear + ReLU (the reference design)."""

    # a placeholder replaces its modality's features, so only rows lacking the modality reach it
    REACHED_BY: ClassVar[dict[str, str]] = {
        "image_norm": "image",
        "text_norm": "text",
        "missing_image": "no-image",
        "missing_text": "no-text",
    }

    def __init__(self, image_dim: int, text_dim: int, fusion_dim: int) -> None:
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.missing_image, self.missing_text = LearnedVector(image_dim), LearnedVector(text_dim)
        self.proj = nn.Linear(image_dim + text_dim, fusion_dim)

    def forward(self, f: Features) -> torch.Tensor:
        image, text = f.pooled()
        image = _fill_missing(self.image_norm(image), f.has_image, self.missing_image)
        text = _fill_missing(self.text_norm(text), f.has_text, self.missing_text)
        return torch.relu(self.proj(torch.cat([image, text], dim=-1)))  # (B, fusion_dim)


class WeightedFusion(nn.Module):
    """Z = sum_i w_i * phi_i(M_i) with w = softmax of learned logits over present modalities."""

    # with one modality present its weight is 1 whatever the logits: they learn from `both` rows
    REACHED_BY: ClassVar[dict[str, str]] = {
        "image_phi": "image",
        "text_phi": "text",
        "logits": "both",
    }

    def __init__(self, image_dim: int, text_dim: int, fusion_dim: int) -> None:
        super().__init__()
        self.image_phi = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, fusion_dim))
        self.text_phi = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, fusion_dim))
        self.logits = LearnedVector(2, init="zeros")  # equal weights at start

    def forward(self, f: Features) -> torch.Tensor:
        image, text = f.pooled()
        phi = torch.stack([torch.relu(self.image_phi(image)), torch.relu(self.text_phi(text))], 1)
        present = torch.stack([f.has_image, f.has_text], dim=1)  # (B, 2)
        logits = self.logits(image).masked_fill(~present, float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # (B, 2)
        return (weights.unsqueeze(-1) * phi).sum(dim=1)  # (B, fusion_dim)

    def modality_weights(self) -> torch.Tensor:
        """The learned weights (image, text) when both modalities are present."""
        return torch.softmax(self.logits.table.weight[0].detach(), dim=-1)


class AttentionFusion(nn.Module):
    """Each modality's pooled feature attends over the tokens of both modalities."""

    # a missing modality's tokens are masked keys and its query is dropped from the mean
    REACHED_BY: ClassVar[dict[str, str]] = {"image_in": "image", "text_in": "text"}

    def __init__(self, image_dim: int, text_dim: int, fusion_dim: int, heads: int = 4) -> None:
        super().__init__()
        if fusion_dim % heads:
            raise ConfigurationError(f"fusion-dim {fusion_dim} must be divisible by {heads} heads.")
        self.heads = heads
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, fusion_dim))
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, fusion_dim))
        self.q, self.k = nn.Linear(fusion_dim, fusion_dim), nn.Linear(fusion_dim, fusion_dim)
        self.v, self.out = nn.Linear(fusion_dim, fusion_dim), nn.Linear(fusion_dim, fusion_dim)
        self.norm = nn.LayerNorm(fusion_dim)

    def forward(self, f: Features) -> torch.Tensor:
        image_tok, text_tok = self.image_in(f.image_tokens), self.text_in(f.text_tokens)
        tokens = torch.cat([image_tok, text_tok], dim=1)  # (B, Ni+T, d)
        key_ok = torch.cat(  # (B, Ni+T): a token is visible when its modality is present
            [
                f.has_image.unsqueeze(1).expand(-1, image_tok.shape[1]),
                f.text_mask & f.has_text.unsqueeze(1),
            ],
            dim=1,
        )
        # (B, 2, d); a missing modality's query is computed but dropped by the final mean
        queries = torch.stack([image_tok.mean(dim=1), masked_mean(text_tok, f.text_mask)], dim=1)
        attended = queries + self.out(
            self._attend(self.q(queries), self.k(tokens), self.v(tokens), key_ok)
        )
        present = torch.stack([f.has_image, f.has_text], dim=1)  # (B, 2)
        return torch.relu(self.norm(masked_mean(attended, present)))  # (B, d)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor
    ) -> torch.Tensor:
        b, d, h = q.shape[0], q.shape[-1], self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, h, d // h).transpose(1, 2)  # (B, h, L, d/h)

        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=key_ok[:, None, None, :]
        )
        return out.transpose(1, 2).reshape(b, -1, d)  # (B, 2, d)


FUSIONS: dict[str, type[ConcatFusion | WeightedFusion | AttentionFusion]] = {
    "concat": ConcatFusion,
    "weighted": WeightedFusion,
    "attention": AttentionFusion,
}
