"""Shared fixtures and helpers: a tiny-preset run config, small demo hospitals on disk, sites
and the round requests a coordinator sends them."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from client.rounds import RoundRequest
from client.site_config import SiteConfig
from client.state import SiteState
from common import protocol as R
from common.config import RunConfig, default_user_config
from common.model.trainable import trainable_state
from simulations.demo_data import write_demo_hospitals

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the machine's cores: one torch thread each keeps them from fighting
    torch.set_num_threads(1)


def tiny_user_config(data_root: Path | str = "demo-data", **overrides: object) -> dict[str, object]:
    """Full run config (pyproject defaults) for the tiny preset, with kebab-case overrides.

    The RDP accountant calibrates in a fraction of PRV's time; PRV is tested where it matters.
    """
    cfg = default_user_config()
    cfg.update({"preset": "tiny", "data-root": str(data_root), "accountant": "rdp"})
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return cfg


def tiny_run(data_root: Path | str = "demo-data", **overrides: object) -> RunConfig:
    """Parsed tiny-preset run config."""
    return RunConfig.from_user_config(tiny_user_config(data_root, **overrides))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small demo hospitals (read-only: tests must not modify them)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_hospitals(root, 3, seed=0, size_scale=0.15)
    return root


@pytest.fixture(scope="session")
def five_hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five demo hospitals of another seed (read-only)."""
    root = tmp_path_factory.mktemp("five")
    write_demo_hospitals(root, 5, seed=1, size_scale=0.3)
    return root


def hospital(
    data_root: Path, state_root: Path, index: int = 0, policy: Path | None = None, **changes: object
) -> SiteConfig:
    """Simulated hospital `index` of `data_root` as a deployed site (its own state folder)."""
    name = f"hospital-{index}"
    return SiteConfig(
        **{
            "site_name": name,
            "manifest": data_root / name,
            "state_dir": state_root / name,
            "policy": policy,
            **changes,
        }
    )


def request(
    state: SiteState,
    run: RunConfig,
    server_round: int,
    parameters: dict | None = None,
    run_key: str = "run-1",
    flower_run_id: int | None = None,
) -> RoundRequest:
    """The round request a coordinator would send (the site's own fingerprint and parameters).

    Each run key is its own Flower run unless `flower_run_id` says otherwise.
    """
    bundle = state.bundle(run.model)
    return RoundRequest(
        server_round=server_round,
        run_key=run_key,
        frozen_fingerprint=bundle.fingerprint,
        parameters=parameters if parameters is not None else trainable_state(bundle.model),
        flower_run_id=zlib.crc32(run_key.encode()) if flower_run_id is None else flower_run_id,
    )


def round_config(fingerprint: str, run_key: str = "run-1") -> ConfigRecord:
    """The per-round facts of a round message (Flower's strategy adds the round number)."""
    return ConfigRecord({R.RUN_KEY: run_key, R.FROZEN_FINGERPRINT: fingerprint})
