"""Fusion of image, text and (when declared) structured-field features into one (B, fusion_dim).

Three modes:
- `concat`: concatenate the pooled features and apply one linear layer (the reference design).
- `weighted`: project each modality to a common size and sum with learned softmax weights,
  Z = sum_i w_i * phi(M_i).
- `attention`: each modality's pooled feature queries the tokens of every modality
  (cross-modal multi-head attention).

The modalities are image and text, and the structured fields' tokens (`common.model.tabular`)
when the run declares any: every fusion works on the list of present modalities in that order,
and builds its tabular parts after the others, so with no fields declared it is the two-modality
fusion, parameter for parameter.

A sample may lack a modality (`has_image` / `has_text` / `has_tabular` false). It is masked,
never zero-filled silently: `concat` substitutes a learned placeholder vector, `weighted`
renormalises the weights over the modalities present, `attention` hides the missing tokens from
the keys and averages only the present modalities' outputs.

Which rows can train which part: each fusion declares, per submodule, the rows whose gradient
reaches it (`REACHED_BY`: `image` / `text` / `tabular` = rows with that modality, `no-image` /
`no-text` / `no-tabular` = rows without it, `several` = rows with two or more); undeclared
submodules are reached by every row. `common.model.modalities` turns this into the parameters a
site cannot train.

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
    tabular_tokens: torch.Tensor | None = None  # (B, F, Dtab); None: no fields declared
    has_tabular: torch.Tensor | None = None  # (B,) bool

    def pooled(self) -> list[torch.Tensor]:
        """Mean image token (B, Di), masked mean text token (B, Dt)[, mean field (B, Dtab)]."""
        pooled = [self.image_tokens.mean(dim=1), masked_mean(self.text_tokens, self.text_mask)]
        if self.tabular_tokens is not None:
            pooled.append(self.tabular_tokens.mean(dim=1))
        return pooled

    def present(self) -> list[torch.Tensor]:
        """Which rows hold each modality, in the order of `pooled`: (B,) bool each."""
        if (self.tabular_tokens is None) != (self.has_tabular is None):
            raise ValueError("tabular_tokens and has_tabular go together (both or neither).")
        tabular = [] if self.has_tabular is None else [self.has_tabular]
        return [self.has_image, self.has_text, *tabular]


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
        "tabular_norm": "tabular",
        "missing_image": "no-image",
        "missing_text": "no-text",
        "missing_tabular": "no-tabular",
    }

    def __init__(
        self, image_dim: int, text_dim: int, fusion_dim: int, *, tabular_dim: int = 0
    ) -> None:
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.missing_image, self.missing_text = LearnedVector(image_dim), LearnedVector(text_dim)
        self.proj = nn.Linear(image_dim + text_dim + tabular_dim, fusion_dim)
        if tabular_dim:  # built last: the two-modality parameters draw the same numbers
            self.tabular_norm, self.missing_tabular = (
                nn.LayerNorm(tabular_dim),
                LearnedVector(tabular_dim),
            )

    def _per_modality(self) -> list[tuple[nn.Module, LearnedVector]]:
        """(normalisation, placeholder) per modality, in the order of `Features.pooled`."""
        parts: list[tuple[nn.Module, LearnedVector]] = [
            (self.image_norm, self.missing_image),
            (self.text_norm, self.missing_text),
        ]
        if hasattr(self, "tabular_norm"):
            parts.append((self.tabular_norm, self.missing_tabular))
        return parts

    def forward(self, f: Features) -> torch.Tensor:
        parts = [
            _fill_missing(norm(x), present, placeholder)  # (B, D_m)
            for x, present, (norm, placeholder) in zip(
                f.pooled(), f.present(), self._per_modality(), strict=True
            )
        ]
        return torch.relu(self.proj(torch.cat(parts, dim=-1)))  # (B, fusion_dim)


class WeightedFusion(nn.Module):
    """Z = sum_i w_i * phi_i(M_i) with w = softmax of learned logits over present modalities."""

    # with one modality present its weight is 1 whatever the logits: they learn from rows with
    # several modalities
    REACHED_BY: ClassVar[dict[str, str]] = {
        "image_phi": "image",
        "text_phi": "text",
        "tabular_phi": "tabular",
        "logits": "several",
    }

    def __init__(
        self, image_dim: int, text_dim: int, fusion_dim: int, *, tabular_dim: int = 0
    ) -> None:
        super().__init__()
        self.image_phi = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, fusion_dim))
        self.text_phi = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, fusion_dim))
        # equal weights at start (a zero init draws no random numbers)
        self.logits = LearnedVector(3 if tabular_dim else 2, init="zeros")
        if tabular_dim:
            self.tabular_phi = nn.Sequential(
                nn.LayerNorm(tabular_dim), nn.Linear(tabular_dim, fusion_dim)
            )

    def forward(self, f: Features) -> torch.Tensor:
        pooled = f.pooled()
        phis = [self.image_phi, self.text_phi]
        if hasattr(self, "tabular_phi"):
            phis.append(self.tabular_phi)
        phi = torch.stack(
            [torch.relu(p(x)) for p, x in zip(phis, pooled, strict=True)], 1
        )  # (B, M, fusion_dim)
        present = torch.stack(f.present(), dim=1)  # (B, M)
        logits = self.logits(pooled[0]).masked_fill(~present, float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # (B, M)
        return (weights.unsqueeze(-1) * phi).sum(dim=1)  # (B, fusion_dim)

    def modality_weights(self) -> torch.Tensor:
        """The learned weights (image, text[, tabular]) when every modality is present."""
        return torch.softmax(self.logits.table.weight[0].detach(), dim=-1)


class AttentionFusion(nn.Module):
    """Each modality's pooled feature attends over the tokens of every modality."""

    # a missing modality's tokens are masked keys and its query is dropped from the mean
    REACHED_BY: ClassVar[dict[str, str]] = {
        "image_in": "image",
        "text_in": "text",
        "tabular_in": "tabular",
    }

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        fusion_dim: int,
        heads: int = 4,
        *,
        tabular_dim: int = 0,
    ) -> None:
        super().__init__()
        if fusion_dim % heads:
            raise ConfigurationError(f"fusion-dim {fusion_dim} must be divisible by {heads} heads.")
        self.heads = heads
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, fusion_dim))
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, fusion_dim))
        self.q, self.k = nn.Linear(fusion_dim, fusion_dim), nn.Linear(fusion_dim, fusion_dim)
        self.v, self.out = nn.Linear(fusion_dim, fusion_dim), nn.Linear(fusion_dim, fusion_dim)
        self.norm = nn.LayerNorm(fusion_dim)
        if tabular_dim:
            self.tabular_in = nn.Sequential(
                nn.LayerNorm(tabular_dim), nn.Linear(tabular_dim, fusion_dim)
            )

    def forward(self, f: Features) -> torch.Tensor:
        image_tok, text_tok = self.image_in(f.image_tokens), self.text_in(f.text_tokens)
        present = f.present()
        toks = [image_tok, text_tok]  # (B, L_m, d) per modality
        key_ok = [  # (B, L_m): a token is visible when its modality is present
            f.has_image.unsqueeze(1).expand(-1, image_tok.shape[1]),
            f.text_mask & f.has_text.unsqueeze(1),
        ]
        # a missing modality's query is computed but dropped by the final mean
        queries = [image_tok.mean(dim=1), masked_mean(text_tok, f.text_mask)]
        if f.tabular_tokens is not None:
            tab_tok = self.tabular_in(f.tabular_tokens)  # (B, F, d)
            toks.append(tab_tok)
            key_ok.append(present[2].unsqueeze(1).expand(-1, tab_tok.shape[1]))
            queries.append(tab_tok.mean(dim=1))
        tokens = torch.cat(toks, dim=1)  # (B, L, d)
        query = torch.stack(queries, dim=1)  # (B, M, d)
        attended = query + self.out(
            self._attend(self.q(query), self.k(tokens), self.v(tokens), torch.cat(key_ok, dim=1))
        )
        return torch.relu(self.norm(masked_mean(attended, torch.stack(present, dim=1))))  # (B, d)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor
    ) -> torch.Tensor:
        b, d, h = q.shape[0], q.shape[-1], self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, h, d // h).transpose(1, 2)  # (B, h, L, d/h)

        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=key_ok[:, None, None, :]
        )
        return out.transpose(1, 2).reshape(b, -1, d)  # (B, M, d)


FUSIONS: dict[str, type[ConcatFusion | WeightedFusion | AttentionFusion]] = {
    "concat": ConcatFusion,
    "weighted": WeightedFusion,
    "attention": AttentionFusion,
}
