"""`fedfusion simulate` on an existing multi-node Ray cluster, as README "On a Ray cluster" shows.

A Ray cluster of two nodes on loopback (`ray start --head` and a second `ray start --address`,
one CPU each, in their own temp folder so that no other Ray user on this machine finds it); the
simulation runs with `RAY_ADDRESS` pointing at it. Checked from the cluster's own tables: the
simulation's ClientApp actors ran on both nodes of that cluster. The cluster's processes (and
only those) are stopped afterwards: `ray stop` would end every Ray process of this user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.runfolder import RunFolder
from simulations.demo_data import write_demo_hospitals
from simulations.loopback import BIN, free_port, kill_survivors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("ray"),
]  # about 1.5 min: a Ray cluster of two nodes, a simulation on it

ROOT = Path(__file__).resolve().parent.parent
# Reads the cluster's tables (GCS) from a separate driver: nodes, and where each actor ran.
CLUSTER_TABLES = """
import json, ray
from ray._private import state
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [{{"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}}
          for a in state.actors().values()]
print(json.dumps({{"nodes": nodes, "actors": actors}}))
"""


def _cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the cluster whose session lives in `temp_dir` (every Ray process names it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _stop_cluster(temp_dir: Path) -> None:
    victims = _cluster_processes(temp_dir)
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    kill_survivors(victims, grace=15.0)


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """(address, temp folder) of a two-node Ray cluster on 127.0.0.1; stopped afterwards."""
    # a short path: Ray's socket paths under it must stay below the 107-character limit
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(BIN / "ray")
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        for argv in (
            [
                ray,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--include-dashboard=false",
                *common,
            ],
            [ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common],
        ):
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"{' '.join(argv)} failed:\n{out.stdout}\n{out.stderr}"
        yield address, temp_dir
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_simulation_runs_on_an_existing_ray_cluster(
    ray_cluster: tuple[str, Path], tmp_path: Path
) -> None:
    address, temp_dir = ray_cluster
    write_demo_hospitals(tmp_path / "data", 2, seed=0, size_scale=0.1)
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations",
            "--hospitals",
            "2",
            "--rounds",
            "1",
            "--preset",
            "tiny",
            "--data-root",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out"),
            "--run-name",
            "on-ray",
            "-c",
            "accountant=rdp",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-5000:]
    assert RunFolder(tmp_path / "out" / "on-ray").read_summary().status == "completed"

    tables = subprocess.run(
        [sys.executable, "-c", CLUSTER_TABLES.format(address=address)],
        env={**env, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tables.returncode == 0, tables.stderr[-3000:]
    found = json.loads(tables.stdout.strip().splitlines()[-1])
    assert len(found["nodes"]) == 2, found
    client_nodes = {a["node"] for a in found["actors"] if a["class"] == "ClientAppActor"}
    assert client_nodes == set(found["nodes"]), found  # the ClientApps ran on both nodes

    _stop_cluster(temp_dir)
    assert not _cluster_processes(temp_dir)  # nothing of the cluster left running
