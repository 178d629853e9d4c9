"""Structured fields (age, sex, labs, vitals): the run's schema, a cell's check and its tensors.

The schema is the run config key `tabular-fields`, one compact string a Flower run config can
carry: fields separated by ";", each `name:numeric:low:high` (a number within [low, high]) or
`name:categorical:A|B|C` (one of the listed categories), for example
"age:numeric:0:120;sex:categorical:F|M". "" declares none (the two-modality model).

Each field is a manifest column of that name; an empty cell (or an absent column) is missing.
Numeric values are scaled with the schema's fixed range, never with statistics of a site's data,
so normalisation releases nothing about the site. Problems name the file, row and column, never
the value (it may be a patient's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.errors import ConfigurationError

KINDS = ("numeric", "categorical")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
CATEGORY = re.compile(r"[^:;|]{1,64}")  # a category: any text but the schema's separators
RESERVED = ("image", "text", "label", "patient_id", "split")  # the manifest's own columns
MAX_FIELDS, MAX_CATEGORIES = 32, 64
EXAMPLE = '"age:numeric:0:120;sex:categorical:F|M"'

Cell = float | str | None  # a checked cell: a number, a category, or None (missing)


class TabularSchemaError(ConfigurationError):
    """The run config's `tabular-fields` cannot be parsed or is inconsistent."""

    default_reason = "run-config"


@dataclass(frozen=True, kw_only=True)
class TabularField:
    """One declared structured field."""

    name: str
    kind: str  # "numeric" or "categorical"
    low: float = 0.0  # numeric: the allowed range, also the fixed scaling range
    high: float = 0.0
    categories: tuple[str, ...] = ()  # categorical: the allowed values, in embedding order

    def check(self, raw: str) -> tuple[Cell, str | None]:
        """The cell's value (None: missing) and, when out of schema, why (without the value)."""
        raw = raw.strip()
        if not raw:
            return None, None
        if self.kind == "categorical":
            if raw in self.categories:
                return raw, None
            return None, f"not one of the categories {list(self.categories)}"
        try:
            value = float(raw)
        except ValueError:
            return None, "not a number"
        if not (math.isfinite(value) and self.low <= value <= self.high):
            return None, f"outside the range {self.low:g} to {self.high:g}"
        return value, None


def _bad(part: str, why: str) -> TabularSchemaError:
    return TabularSchemaError(
        f"Run config key 'tabular-fields' has {part[:80]!r}: {why}. Write fields separated by "
        "';', each name:numeric:low:high or name:categorical:A|B|..., for example "
        f'{EXAMPLE}; "" declares none.'
    )


def _parse_field(part: str) -> TabularField:
    name, _, rest = part.partition(":")
    kind, _, spec = rest.partition(":")
    name, kind = name.strip(), kind.strip()
    if not FIELD_NAME.fullmatch(name):
        raise _bad(part, "a name is 1 to 32 letters, digits or '_', not starting with a digit")
    if name in RESERVED:
        raise _bad(part, f"{name!r} is a manifest column of its own ({', '.join(RESERVED)})")
    if kind == "numeric":
        bounds = spec.split(":")
        try:
            low, high = (float(b) for b in bounds) if len(bounds) == 2 else (math.nan, math.nan)
        except ValueError:
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise _bad(part, "a numeric field needs two finite bounds low < high")
        return TabularField(name=name, kind=kind, low=low, high=high)
    if kind == "categorical":
        categories = tuple(c.strip() for c in spec.split("|"))
        ok = all(CATEGORY.fullmatch(c) for c in categories) and len(set(categories)) == len(
            categories
        )
        if not (ok and 2 <= len(categories) <= MAX_CATEGORIES):
            raise _bad(part, f"a categorical field lists 2 to {MAX_CATEGORIES} distinct categories")
        return TabularField(name=name, kind=kind, categories=categories)
    raise _bad(part, f"the kind must be one of {list(KINDS)}")


def parse_tabular_fields(text: str) -> tuple[TabularField, ...]:
    """The schema `tabular-fields` declares (empty: none), or a TabularSchemaError."""
    parts = [p for p in (p.strip() for p in text.split(";")) if p]
    fields = tuple(_parse_field(p) for p in parts)
    if len(fields) > MAX_FIELDS:
        raise _bad(text, f"at most {MAX_FIELDS} fields")
    if len({f.name for f in fields}) != len(fields):
        raise _bad(text, "a field name appears twice")
    return fields


@dataclass(frozen=True)
class TabularLayout:
    """Where each field goes in the encoder's inputs: numeric and categorical fields apart."""

    fields: tuple[TabularField, ...]

    @property
    def numeric(self) -> tuple[int, ...]:
        """Schema positions of the numeric fields."""
        return tuple(i for i, f in enumerate(self.fields) if f.kind == "numeric")

    @property
    def categorical(self) -> tuple[int, ...]:
        """Schema positions of the categorical fields."""
        return tuple(i for i, f in enumerate(self.fields) if f.kind == "categorical")


def encode_cells(
    fields: Sequence[TabularField], rows: Sequence[Sequence[Cell]]
) -> dict[str, torch.Tensor]:
    """Rows of checked cells -> the model's tabular inputs (missing cells are 0, flagged).

    `tabular_numeric` (N, F_num) float in [-1, 1] by the schema's fixed range;
    `tabular_categorical` (N, F_cat) long category index; `tabular_missing` (N, F) bool in
    schema order; `has_tabular` (N,) bool, true when at least one field is present.
    """
    layout = TabularLayout(tuple(fields))
    numeric = torch.zeros(len(rows), len(layout.numeric))
    categorical = torch.zeros(len(rows), len(layout.categorical), dtype=torch.long)
    missing = torch.tensor([[c is None for c in row] for row in rows], dtype=torch.bool)
    missing = missing.reshape(len(rows), len(fields))
    for r, row in enumerate(rows):
        for j, i in enumerate(layout.numeric):
            value, f = row[i], fields[i]
            if isinstance(value, float):
                numeric[r, j] = 2.0 * (value - f.low) / (f.high - f.low) - 1.0
        for j, i in enumerate(layout.categorical):
            value, f = row[i], fields[i]
            if isinstance(value, str):
                categorical[r, j] = f.categories.index(value)
    return {
        "tabular_numeric": numeric,
        "tabular_categorical": categorical,
        "tabular_missing": missing,
        "has_tabular": ~missing.all(dim=1),
    }


TABULAR_KEYS = ("tabular_numeric", "tabular_categorical", "tabular_missing", "has_tabular")
