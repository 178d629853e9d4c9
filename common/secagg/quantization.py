"""Clipping, stochastic rounding into the ring Z_(2**bits), and the signed decoding of a sum."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def quantize(
    values: NDArray[np.floating], *, clip: float, scale: float, rng: np.random.Generator
) -> NDArray[np.int64]:
    """round(clip(x) * scale), rounded up with probability equal to the fraction: unbiased."""
    scaled = np.clip(values.astype(np.float64), -clip, clip) * scale
    floor = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - floor)
    return (floor + up).astype(np.int64)


def to_ring(values: NDArray[np.int64], *, bits: int) -> NDArray[np.uint64]:
    """Signed integers as elements of Z_(2**bits) (two's complement, then reduced)."""
    return values.astype(np.int64).view(np.uint64) & np.uint64(2**bits - 1)


def from_ring(values: NDArray[np.uint64], *, bits: int) -> NDArray[np.int64]:
    """Ring elements as signed integers in [-2**(bits-1), 2**(bits-1))."""
    reduced = (values & np.uint64(2**bits - 1)).astype(np.int64)
    return np.where(reduced >= 2 ** (bits - 1), reduced - 2**bits, reduced)


def dequantize(values: NDArray[np.int64], *, scale: float) -> NDArray[np.float64]:
    """Integers back to floats: the inverse of the scaling (rounding is not undone)."""
    return values.astype(np.float64) / scale
