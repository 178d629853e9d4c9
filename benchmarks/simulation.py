"""A timed local simulation: the project's ServerApp and ClientApp under Flower's Ray runtime,
with every ClientApp call timed inside the client and the memory of all processes sampled.

The apps are `simulations.run.make_apps`'s; the ClientApp handlers here only wrap the same
`client.app` functions with a timer that appends (start, end) to a file (Ray runs them in
worker processes). Backend settings equal `simulations.run.simulate`'s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class SimulationTiming:
    """Wall time, client busy intervals and peak memory of one simulation."""

    wall_s: float
    intervals: list[tuple[float, float]]  # (start, end) of each ClientApp call, seconds from start
    peak_rss_bytes: int  # the driver and all its descendants (Ray's processes), summed
    peak_largest_rss_bytes: int = 0  # the largest single process among them

    @property
    def client_compute_s(self) -> float:
        """Sum of the ClientApp calls' durations."""
        return sum(end - start for start, end in self.intervals)

    @property
    def busy_s(self) -> float:
        """Time during which at least one client computed (the union of the intervals)."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    @property
    def first_client_s(self) -> float:
        """Seconds from the start until the first client call (Ray and app start-up)."""
        return min((s for s, _ in self.intervals), default=self.wall_s)


def _client_app(config: dict[str, Any], log_path: Path) -> Any:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from client import app as client_app

    client = ClientApp()

    def timed(kind: str, msg: Message, context: Context) -> Message:
        start = time.time()
        try:
            handler = client_app.train if kind == "train" else client_app.evaluate
            configured = Context(
                run_id=context.run_id,
                node_id=context.node_id,  # Flower's Python
                node_config=context.node_config,
                state=context.state,  # simulation
                run_config=config,
            )  # gives apps no run config
            return handler(msg, configured)
        finally:
            with log_path.open("a") as fh:  # one short line per call: appends do not interleave
                fh.write(json.dumps([kind, start, time.time()]) + "\n")

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return timed("train", msg, context)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return timed("evaluate", msg, context)

    return client


class _PeakMemory(threading.Thread):
    """Samples the RSS of this process and its descendants until stopped: summed and the largest."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.largest = interval, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._stop_event.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue  # a process that just ended
                total += rss
                self.largest = max(self.largest, rss)
            self.peak = max(self.peak, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak


def timed_simulation(
    user_config: Mapping[str, Any], hospitals: int, work: Path
) -> SimulationTiming:
    """Run the federation with `hospitals` simulated sites; time it and its clients."""
    from flwr.simulation import run_simulation

    from simulations.run import backend_config, make_apps

    config = dict(user_config)
    log_path = work / f"client-calls-{time.time_ns()}.jsonl"
    server, _ = make_apps(config)
    client = _client_app(config, log_path)
    backend = backend_config(verbose=False)
    memory = _PeakMemory()
    memory.start()
    start = time.time()
    try:
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=hospitals,
            backend_config=backend,
            verbose_logging=False,
        )
    finally:
        wall = time.time() - start
        peak = memory.stop()
    calls = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.is_file()
        else []
    )
    return SimulationTiming(
        wall, [(s - start, e - start) for _, s, e in calls], peak, memory.largest
    )
