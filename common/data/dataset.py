"""The torch Dataset over a site's manifest rows: images read lazily, reports tokenised once.

With structured fields declared, each case also carries them (`common.data.tabular.
encode_cells`); with none, a case holds exactly the image and text tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from common.data.images import ImageReadError, read_gray
from common.data.manifest import Row
from common.data.tabular import TabularField, encode_cells

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Case = dict[str, torch.Tensor]  # one case: its tensors by name (a DataLoader batches them by key)


class Cases(Protocol):
    """A map-style dataset of cases that has a length (a `ManifestDataset`, a `PaddedText`, ...)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Case: ...


class ManifestDataset(Dataset[Case]):
    """Rows -> dict of tensors; images are read lazily, reports tokenised once up front."""

    def __init__(
        self,
        manifest: Path,
        rows: list[Row],
        class_names: tuple[str, ...],
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        max_text_length: int,
        *,
        fields: tuple[TabularField, ...] = (),
    ) -> None:
        self.manifest, self.rows, self.image_size = manifest, rows, image_size
        assert all(len(r.tabular) == len(fields) for r in rows), "rows read with another schema"
        # the structured fields, encoded once: name -> (N, ...) (empty: none declared)
        self.tabular = encode_cells(fields, [r.tabular for r in rows]) if fields else {}
        # -1: an unlabelled case (prediction only; training and evaluation rows always have one)
        self.labels = torch.tensor(
            [class_names.index(r.label) if r.label else -1 for r in rows], dtype=torch.long
        )
        # padded to the longest report of these rows (at most max_text_length tokens), not to
        # max_text_length: a long limit costs nothing where the reports are short
        enc = tokenizer(
            [r.text for r in rows] or [""],
            padding="longest",
            truncation=True,
            max_length=max_text_length,
            return_tensors="pt",
        )
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self._mean, self._std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        has_image = row.image is not None
        image = (
            self._load_image(row, row.image)
            if row.image is not None
            else torch.zeros(3, self.image_size, self.image_size)
        )
        return {
            "images": image,  # (3, S, S)
            "input_ids": self.input_ids[i],  # (T,)
            "attention_mask": self.attention_mask[i],  # (T,)
            "has_image": torch.tensor(has_image),
            "has_text": torch.tensor(bool(row.text)),
            "labels": self.labels[i],
            **{name: t[i] for name, t in self.tabular.items()},  # (F_num,), (F_cat,), (F,), ()
        }

    def _load_image(self, row: Row, path: Path) -> torch.Tensor:
        """Grayscale image -> normalised (3, S, S) tensor for the ImageNet-style encoder."""
        try:
            gray = read_gray(path)  # (H, W) in [0, 1]
        except ImageReadError as err:
            # one-argument exception: a DataLoader worker re-raises it by type and message
            raise ImageReadError(f"{self.manifest}:{row.line}: {err}") from err
        resized = Image.fromarray(gray).resize(
            (self.image_size, self.image_size), Image.Resampling.BILINEAR
        )
        x = torch.from_numpy(np.array(resized, dtype=np.float32))  # (S, S)
        # the grayscale fills the encoder's 3 input channels
        return (x.unsqueeze(0).expand(3, -1, -1) - self._mean) / self._std


def text_length(dataset: Cases) -> int:
    """How many tokens each case of `dataset` carries (a dataset pads to its longest report)."""
    return int(dataset[0]["input_ids"].shape[0]) if len(dataset) else 0


class PaddedText(Dataset[Case]):
    """Another dataset's cases, their tokens right-padded to `length` so that datasets tokenised
    apart can be batched together; the padding is masked out, so the model's outputs are the same.
    """

    def __init__(self, dataset: Cases, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        case = dict(self.dataset[i])
        pad = self.length - case["input_ids"].shape[0]
        if pad < 0:
            raise ValueError(
                f"a case has {case['input_ids'].shape[0]} tokens, more than the "
                f"{self.length} to pad to."
            )
        if pad:
            case["input_ids"] = torch.nn.functional.pad(case["input_ids"], (0, pad))  # (length,)
            case["attention_mask"] = torch.nn.functional.pad(case["attention_mask"], (0, pad))
        return case
