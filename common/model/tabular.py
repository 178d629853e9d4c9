"""The tabular encoder: a site's structured fields -> one token per field, phi(M_tab) (B, F, D).

A numeric field's token is its value (already scaled to [-1, 1] by the schema's fixed range,
`common.data.tabular`) times a learned direction, plus the field's learned embedding; a
categorical field's token is its category's embedding plus the field's; a missing cell's token is
the field's learned missing indicator instead (so missingness itself can carry signal). A small
linear layer + ReLU then acts on every token. The fusion pools the tokens like the image's.

Only layers Opacus computes per-sample gradients for (Embedding, Linear) hold parameters, so the
encoder trains under DP-SGD like the rest of the trainable set (index tensors are made contiguous:
Opacus' ghost-clipping norm of an Embedding views them). Index tensors are non-persistent
buffers: they follow from the schema, which `ModelConfig.tabular_fields` stores.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from common.data.tabular import TabularField, TabularLayout


class TabularEncoder(nn.Module):
    """Structured fields (numeric, categorical, missing flags) -> tokens (B, F, dim)."""

    field_ids: torch.Tensor  # (F,) buffers: indices that follow from the schema
    schema_order: torch.Tensor  # (F,)
    numeric_ids: torch.Tensor  # (F_num,)
    category_offsets: torch.Tensor  # (F_cat,)

    def __init__(self, fields: tuple[TabularField, ...], dim: int) -> None:
        super().__init__()
        layout = TabularLayout(fields)
        self.dim, n = dim, len(fields)
        order = [*layout.numeric, *layout.categorical]  # schema position of each value token
        self.register_buffer("field_ids", torch.arange(n), persistent=False)  # (F,)
        self.register_buffer(  # values (numeric then categorical) -> schema order
            "schema_order", torch.tensor([order.index(i) for i in range(n)]), persistent=False
        )
        self.register_buffer("numeric_ids", torch.arange(len(layout.numeric)), persistent=False)
        sizes = [len(fields[i].categories) for i in layout.categorical]
        offsets = [0, *itertools.accumulate(sizes)][:-1]
        self.register_buffer("category_offsets", torch.tensor(offsets), persistent=False)
        self.field_embedding = nn.Embedding(n, dim)  # every field's identity
        self.missing = nn.Embedding(n, dim)  # the learned missing indicator per field
        # one direction per numeric field, one embedding per category of every categorical field
        self.numeric = nn.Embedding(len(layout.numeric), dim) if layout.numeric else None
        self.categories = nn.Embedding(sum(sizes), dim) if sizes else None
        self.mix = nn.Linear(dim, dim)

    def forward(
        self,
        numeric: torch.Tensor,  # (B, F_num) float in [-1, 1]
        categorical: torch.Tensor,  # (B, F_cat) long category index within its field
        missing: torch.Tensor,  # (B, F) bool, schema order
    ) -> torch.Tensor:
        return self.from_field_tokens(self.field_tokens(numeric, categorical, missing))

    def from_field_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's output from its per-field tokens (B, F, D) -> (B, F, D)."""
        return torch.relu(self.mix(tokens))

    def missing_tokens(self, batch: int) -> torch.Tensor:
        """The per-field tokens of rows whose every field is missing (B, F, D)."""
        tokens: torch.Tensor = self.missing(self.field_ids.expand(batch, -1).contiguous())
        return tokens

    def field_tokens(
        self, numeric: torch.Tensor, categorical: torch.Tensor, missing: torch.Tensor
    ) -> torch.Tensor:
        """One token per field before the mix (B, F, D): value + field, or the missing one."""
        b = missing.shape[0]
        values = []
        if self.numeric is not None:
            ids = self.numeric_ids.expand(b, -1).contiguous()  # (B, F_num)
            values.append(self.numeric(ids) * numeric.unsqueeze(-1))  # (B, F_num, D)
        if self.categories is not None:
            values.append(self.categories(categorical + self.category_offsets))  # (B, F_cat, D)
        tokens = torch.cat(values, dim=1)[:, self.schema_order]  # (B, F, D)
        fields = self.field_ids.expand(b, -1).contiguous()  # (B, F)
        tokens = tokens + self.field_embedding(fields)
        return torch.where(missing.unsqueeze(-1), self.missing(fields), tokens)  # (B, F, D)
