"""A site's contribution as one ring vector: update coordinates, trained indicators, weight."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigurationError
from common.secagg.params import RoundParams
from common.secagg.quantization import dequantize, from_ring, quantize, to_ring


@dataclass(frozen=True, kw_only=True)
class UpdateSum:
    """The sum over the surviving sites, unpacked: nothing per site."""

    sums: dict[str, NDArray[np.float64]]  # name -> sum of the sites' (quantized) arrays
    counts: dict[str, int]  # name -> how many sites trained that array
    weight: int  # the sum of the sites' weights


def pack(
    update: Mapping[str, NDArray[np.floating]],
    *,
    weight: int,
    params: RoundParams,
    rng: np.random.Generator,
) -> NDArray[np.uint64]:
    """A site's vector: its arrays (zeros where untrained), 1/0 per array trained, its weight."""
    names = [name for name, _ in params.layout.shapes]
    unknown = sorted(set(update) - set(names))
    if unknown:
        raise ConfigurationError(
            f"the update holds arrays {unknown} the round's layout does not name; only the "
            "layout's arrays can be aggregated",
            reason="message",
        )
    if type(weight) is not int or not 0 <= weight <= params.max_weight:
        raise ConfigurationError(
            f"weight {weight!r} must be an integer in [0, {params.max_weight}] (max_weight)",
            reason="message",
        )
    parts: list[NDArray[np.int64]] = []
    for name, shape in params.layout.shapes:
        array = update.get(name)
        if array is None:
            parts.append(np.zeros(math.prod(shape), dtype=np.int64))
            continue
        if array.shape != shape or not np.all(np.isfinite(array)):
            raise ConfigurationError(
                f"array {name!r} has shape {array.shape} (the layout says {shape}) or a "
                "non-finite value; send finite arrays of the layout's shapes",
                reason="message",
            )
        parts.append(quantize(array.ravel(), clip=params.clip, scale=params.scale, rng=rng))
    trained = np.array([name in update for name in names], dtype=np.int64)  # (arrays,)
    parts += [trained, np.array([weight], dtype=np.int64)]
    return to_ring(np.concatenate(parts), bits=params.bits)


def unpack(total: NDArray[np.uint64], *, params: RoundParams) -> UpdateSum:
    """The sum of packed vectors, as float sums per array, counts per array and the weight."""
    assert total.shape == (params.layout.length,), "the sum has the layout's length"
    signed = from_ring(total, bits=params.bits)  # (length,)
    sums: dict[str, NDArray[np.float64]] = {}
    start = 0
    for name, shape in params.layout.shapes:
        size = math.prod(shape)
        sums[name] = dequantize(signed[start : start + size], scale=params.scale).reshape(shape)
        start += size
    names = [name for name, _ in params.layout.shapes]
    counts = {name: int(c) for name, c in zip(names, signed[start:-1], strict=True)}
    return UpdateSum(sums=sums, counts=counts, weight=int(signed[-1]))
