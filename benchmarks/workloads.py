"""What the benchmarks train on: demo hospitals on disk, run configs, one timed local epoch.

The local epoch is the site's own recipe (`client.rounds.train_locally`: the DataLoader, SGD,
the feature cache when on, Opacus DP-SGD when an account is given), so the numbers are the
system's, not a re-implementation's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.rounds import LocalWork, train_locally
from client.site_config import SiteConfig
from client.state import SiteState, SiteStates
from common.config import RunConfig, default_user_config
from common.model.trainable import trainable_state
from common.privacy.accounting import Account, sample_rate
from simulations.demo_data import write_demo_hospitals

SITES = SiteStates(max_sites=32)  # warm sites of this process, as a hospital keeps its own

SEED_TEXT = "builtin:bert-base"  # the seed preset's shape with random weights (no download)


def bench_user_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """The default run config for `preset` with kebab-case overrides: every key, as apps get it."""
    values: dict[str, Any] = {"preset": preset}
    if preset == "seed":
        values["text-encoder"] = SEED_TEXT
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return {**default_user_config(), **values}


def bench_config(preset: str, **overrides: Any) -> RunConfig:
    """`bench_user_config`, parsed."""
    return RunConfig.from_user_config(bench_user_config(preset, **overrides))


def demo_hospitals(root: Path, n: int, size_scale: float = 1.0, seed: int = 0) -> list[Path]:
    """Write (once) `n` demo hospitals under `root`; their folders."""
    folders = [root / f"hospital-{i}" for i in range(n)]
    if not all((f / "manifest.csv").is_file() for f in folders):
        write_demo_hospitals(root, n, seed=seed, size_scale=size_scale)
    return folders


def site(folder: Path, state_root: Path) -> SiteConfig:
    """A site reading `folder`, keeping its state under `state_root`."""
    return SiteConfig(site_name=folder.name, manifest=folder, state_dir=state_root / folder.name)


@dataclass(frozen=True)
class EpochTiming:
    """One timed call of the site's local training."""

    examples: int
    seconds: float  # inside the training loop (what `train` reports)
    wall_seconds: float  # the whole call, including filling the feature cache on a miss

    @property
    def samples_per_s(self) -> float:
        """Training throughput."""
        return self.examples / self.seconds


def local_epoch(run: RunConfig, state: SiteState, *, dp: bool, round_: int = 1) -> EpochTiming:
    """One call of the site's local training (`local-epochs` passes) from the initial model."""
    bundle, data = state.bundle(run.model), state.data(run)
    account = None
    if dp:
        q = sample_rate(num_examples=len(data.train), batch_size=run.train.batch_size)
        account = Account(
            accountant=run.privacy.accountant,
            delta=run.privacy.target_delta,
            noise_multiplier=1.0,
            sample_rate=q,
        )
    work = LocalWork(
        server_round=round_,
        start=trainable_state(bundle.model),
        untrained=(),
        account=account,
        max_grad_norm=run.privacy.max_grad_norm,
    )
    start = time.perf_counter()
    result = train_locally(state, run, work).result
    wall = time.perf_counter() - start
    return EpochTiming(result.examples_seen, result.seconds, wall)


def best_epoch(run: RunConfig, state: SiteState, *, dp: bool, repeats: int) -> EpochTiming:
    """Fastest of `repeats` local epochs (the machine is shared: the best is least disturbed)."""
    timings = [local_epoch(run, state, dp=dp) for _ in range(repeats)]
    return min(timings, key=lambda t: t.seconds / max(t.examples, 1))


def load_site(folder: Path, state_root: Path) -> SiteState:
    """A site's warm state (kept per process, like a site's)."""
    return SITES.get(site(folder, state_root))
