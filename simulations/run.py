"""A multi-hospital federation on one machine, or on a Ray cluster: Flower's simulation runtime
(Ray backend; `RAY_ADDRESS` names an existing cluster) behind a local SuperLink (`runtime.py`).

Each simulated hospital is a folder `<data-root>/hospital-<i>/` in the real site format; the
same ServerApp and ClientApp as in deployment run here, with the whole run config given to
`flwr run`. `make_apps` serves the benchmarks, which time every ClientApp call in-process on
Flower's Python entry point (`run_simulation`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from common.runfolder import SUMMARY, HistoryLine, RunFolder
from simulations.demo_data import write_demo_hospitals

log = logging.getLogger(__name__)


def make_apps(user_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """ServerApp and ClientApp that see `user_config` as their run config.

    (Flower's Python simulation entry point hands apps an empty run config.)
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from client import app as client_app
    from server import app as server_app

    config = dict(user_config)
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        server_app.run_federation(grid, RunConfig.from_user_config(config))

    def configured(context: Context) -> Context:
        return Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config=config,
        )

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_app.train(msg, configured(context))

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_app.evaluate(msg, configured(context))

    return server, client


def ray_cluster_address() -> str | None:
    """The Ray cluster to run on: `RAY_ADDRESS` (e.g. `10.0.0.5:6379`), or None for a local one."""
    return os.environ.get("RAY_ADDRESS") or None


def backend_config(*, verbose: bool) -> dict[str, Any]:
    """Ray backend settings for Flower's Python entry point (benchmarks): one CPU per ClientApp.

    Without `RAY_ADDRESS`, a private Ray instance with this machine's cores (`address="local"`:
    never a cluster that `ray start` left running here). With it, Flower's backend connects to
    that cluster (it calls `ray.init()` only when Ray is not initialised, and reads no address
    key itself), whose nodes bring their own CPUs.
    """
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "WARNING",
        "log_to_driver": verbose,
    }
    if ray_cluster_address() is None:
        init_args.update(address="local", num_cpus=os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def hospital_folders(data_root: Path) -> list[Path]:
    """The `hospital-<i>` folders of a data root, in index order; they must be 0..N-1."""
    folders = sorted(
        (p for p in data_root.glob("hospital-*") if p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
    )
    expected = [f"hospital-{i}" for i in range(len(folders))]
    if [p.name for p in folders] != expected:
        raise ConfigError(
            f"{data_root} must hold folders hospital-0 .. hospital-{len(folders) - 1}; found "
            f"{[p.name for p in folders]}."
        )
    return folders


def prepare_demo_data(data_root: Path, hospitals: int, seed: int) -> None:
    """Write the demo hospitals under `data_root` unless enough are already there."""
    existing = hospital_folders(data_root) if data_root.is_dir() else []
    if len(existing) >= hospitals:
        return
    if existing:
        raise ConfigError(
            f"{data_root} holds {len(existing)} hospital folders but {hospitals} were asked for. "
            "Remove the folder to regenerate the demo data, or ask for fewer hospitals."
        )
    print(f"Writing demo data for {hospitals} hospitals to {data_root} ...", flush=True)
    write_demo_hospitals(data_root, hospitals, seed=seed)


def simulate(
    user_config: Mapping[str, Any],
    hospitals: int,
    *,
    verbose: bool = False,
    on_round: Callable[[HistoryLine], None] | None = None,
) -> RunFolder:
    """Run the federation with `hospitals` simulated sites; return the run folder.

    On Flower's supported path (`simulations.runtime`: `flwr run` against a private local
    SuperLink in simulation mode); `on_round` sees each round once its history line is written.
    """
    from simulations.runtime import run_local

    run = RunConfig.from_user_config(user_config)  # fail fast, before anything starts
    data_root = Path(run.data.data_root)
    if not data_root.is_dir():
        raise ConfigError(
            f"Data root {data_root} does not exist: it should hold one folder per "
            "hospital, hospital-0 .. hospital-<N-1>."
        )
    found = len(hospital_folders(data_root))
    if found < hospitals:
        raise ConfigError(
            f"{data_root} holds {found} hospital folder(s) (hospital-<i>); "
            f"{hospitals} were asked for."
        )
    from server.resume import check_run_folder

    finished = check_run_folder(run)  # a run to resume must fit; fail before anything starts
    if finished:
        log.info("resuming run %s after round %d", run.federation.run_name, finished)
    # the name is chosen here, so that this command knows the folder the ServerApp writes
    name = run.federation.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    folder = RunFolder(Path(run.federation.output_dir).expanduser().resolve() / name)
    started = time.time()
    cluster = ray_cluster_address()
    if cluster:
        log.info("running on the Ray cluster at %s (RAY_ADDRESS)", cluster)
    result = run_local(
        {**user_config, "run-name": name},
        hospitals,
        folder,
        cluster=cluster is not None,
        verbose=verbose,
        on_round=on_round,
    )
    summary = folder.path / SUMMARY
    if not summary.is_file() or summary.stat().st_mtime < started:
        raise RuntimeError(
            f"The simulation ended without a run summary (flwr run exit code "
            f"{result.returncode}). The end of Flower's log:\n{result.log_tail}"
        )
    return folder
