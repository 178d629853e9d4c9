"""Shared fixtures: a tiny-preset run config and small demo hospitals on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RunConfig, default_user_config
from common.demo_data import write_demo_hospitals


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
