"""One benchmark's outcome, the machine it ran on, and the JSON files it is written to."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = (
    "flwr",
    "torch",
    "torchvision",
    "transformers",
    "opacus",
    "peft",
    "numpy",
    "ray",
    "flwr-datasets",
)


@dataclass(frozen=True)
class Outcome:
    """A benchmark's headline number against its target, and everything behind it."""

    key: str  # the summary.json key
    value: float
    target: str  # e.g. "<= 1.2"
    note: str  # how the value was obtained; why a target is missed
    settings: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, tuple[float, str]] = field(
        default_factory=dict
    )  # more summary keys: (value, target)

    @property
    def met(self) -> bool:
        """Whether the value meets its target."""
        return meets(self.value, self.target)


def meets(value: float, target: str) -> bool:
    """Whether `value` meets a target written as "<= 1.2" or ">= 50"."""
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def machine() -> dict[str, Any]:
    """The machine and its load, for reading the timings."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        first = meminfo.read_text().splitlines()[0].split()
        memory = round(int(first[1]) / 1024**2, 1)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries the numbers depend on."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_outcome(name: str, outcome: Outcome, seconds: float, quick: bool, out_dir: Path) -> Path:
    """benchmarks/results/<name>.json: value, target, machine, versions, settings, raw numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        **asdict(outcome),
        "met": outcome.met,
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": machine(),
        "versions": versions(),
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_plain(doc), indent=2) + "\n")
    return path
