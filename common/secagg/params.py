"""The public parameters of one secure aggregation round: the cohort, threshold, ring and vector."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import ConfigurationError

MAX_COHORT = 64  # the neighbour graph is complete: each site agrees keys with every other
MAX_COORDINATES = 100_000_000  # 800 MB of uint64 per masked vector: far above any update here
MAX_NODE_ID = 2**64 - 1  # Flower node ids are unsigned 64-bit
MIN_BITS, MAX_BITS = 16, 62  # the ring Z_(2**bits) in uint64, with a sign bit to decode sums


def _reject(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"secure aggregation parameters: {what}; the coordinator's round parameters must be fixed "
        "before the round is sent",
        reason="message",
    )


def min_safe_threshold(*, cohort_size: int, colluders: int) -> int:
    """The least threshold t at which no coordinator, with `colluders` sites, unmasks one site.

    An honest site reveals, for each neighbour, either its share of the self-mask seed or its
    share of the masking key, never both. To learn both secrets of a victim, a coordinator needs
    t shares of each: the colluders give both, the n - c honest holders at most one each, so
    2t <= 2c + (n - c). Hence t > (n + c) / 2, which also gives t > n / 2 and t > c.
    """
    return (cohort_size + colluders) // 2 + 1


@dataclass(frozen=True, kw_only=True)
class RoundKey:
    """Which run and round a message belongs to; bound into every key, share and message."""

    run: str
    round: int

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not 0 < len(self.run) <= 256:
            raise _reject(f"the run id must be a string of 1 to 256 characters, not {self.run!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int):
            raise _reject(f"the round must be an integer, not {type(self.round).__name__}")
        if not 0 <= self.round < 2**31:
            raise _reject(f"the round must be in [0, 2**31), not {self.round}")

    def encode(self) -> bytes:
        """The key as bytes, for key derivation and authenticated encryption contexts."""
        run = self.run.encode()
        return len(run).to_bytes(2, "big") + run + self.round.to_bytes(4, "big")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The named arrays an update holds, in order; the vector is their coordinates, then one
    trained indicator per array, then the weight."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, tuple) or not self.shapes:
            raise _reject("the layout must be a non-empty tuple of (name, shape)")
        for entry in self.shapes:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise _reject(f"a layout entry must be (name, shape), not {entry!r}")
            name, shape = entry
            if not 0 < len(name) <= 256 or not isinstance(shape, tuple):
                raise _reject(f"array {name!r}: a name of 1 to 256 characters and a tuple shape")
            if not all(type(d) is int and 0 < d <= MAX_COORDINATES for d in shape):
                raise _reject(f"array {name!r}: every dimension must be a positive integer")
        names = [name for name, _ in self.shapes]
        if len(set(names)) != len(names):
            raise _reject("the layout's array names must be unique")
        if self.coordinates > MAX_COORDINATES:
            raise _reject(f"{self.coordinates} coordinates; at most {MAX_COORDINATES}")

    @property
    def coordinates(self) -> int:
        """How many update coordinates the vector holds (before indicators and weight)."""
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def length(self) -> int:
        """The whole vector's length: coordinates, one indicator per array, the weight."""
        return self.coordinates + len(self.shapes) + 1


@dataclass(frozen=True, kw_only=True)
class RoundParams:
    """What every party of one round agrees on; a site checks it against its own rules."""

    round: RoundKey
    cohort: tuple[int, ...]  # sorted node ids; a node's Shamir x-coordinate is its position + 1
    threshold: int  # t: shares needed to reconstruct any secret
    bits: int  # the ring is Z_(2**bits)
    clip: float  # each update coordinate is clipped to [-clip, clip]
    scale: float  # then quantized to round(x * scale) (stochastic rounding)
    noise_bound: int = 0  # the largest |noise| a site may add per coordinate
    max_weight: int  # the largest weight (record count) a site may contribute
    layout: Layout

    def __post_init__(self) -> None:
        if not isinstance(self.round, RoundKey) or not isinstance(self.layout, Layout):
            raise _reject("round must be a RoundKey and layout a Layout")
        self._check_cohort()
        for name in ("threshold", "bits", "noise_bound", "max_weight"):
            if type(getattr(self, name)) is not int:
                raise _reject(f"{name} must be an integer")
        if not 2 <= self.threshold <= len(self.cohort):
            raise _reject(f"threshold {self.threshold} must be in [2, {len(self.cohort)}]")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise _reject(f"bits {self.bits} must be in [{MIN_BITS}, {MAX_BITS}]")
        for name in ("clip", "scale"):
            value = getattr(self, name)
            if type(value) not in (float, int) or not (math.isfinite(value) and value > 0):
                raise _reject(f"{name} must be a finite positive number, not {value!r}")
        if self.noise_bound < 0 or self.max_weight < 1:
            raise _reject("noise_bound must be >= 0 and max_weight >= 1")
        self._check_headroom()

    def _check_cohort(self) -> None:
        cohort = self.cohort
        if not isinstance(cohort, tuple) or not all(type(n) is int for n in cohort):
            raise _reject("the cohort must be a tuple of integer node ids")
        if not 2 <= len(cohort) <= MAX_COHORT:
            raise _reject(f"a cohort of {len(cohort)} sites; it must hold 2 to {MAX_COHORT}")
        if list(cohort) != sorted(set(cohort)) or not 0 <= cohort[0] <= cohort[-1] <= MAX_NODE_ID:
            raise _reject("the cohort must be sorted, without repeats, of unsigned 64-bit ids")

    def _check_headroom(self) -> None:
        # the sum of n contributions must stay below 2**(bits-1) in magnitude to decode its sign
        half = 2 ** (self.bits - 1)
        per_site = math.ceil(self.clip * self.scale) + 1 + self.noise_bound
        n = len(self.cohort)
        if n * per_site >= half or n * self.max_weight >= half:
            raise _reject(
                f"{n} sites of |value| <= {per_site} (or weight {self.max_weight}) can overflow "
                f"the ring of {self.bits} bits; raise bits or lower scale, clip or noise_bound"
            )

    @property
    def modulus(self) -> int:
        """The ring's size, 2**bits."""
        return 1 << self.bits

    def position(self, node: int) -> int:
        """A cohort member's Shamir x-coordinate: its 1-based position in the cohort."""
        return self.cohort.index(node) + 1

    def neighbours(self, node: int) -> tuple[int, ...]:
        """The sites `node` masks with and shares its secrets among: all others (complete graph)."""
        return tuple(n for n in self.cohort if n != node)
