"""Secure aggregation's cost per round: secure rounds against plain rounds, 10 simulated sites.

Each setting is a whole ServerApp run (`server.app.run_federation`: the round loop, its reply
checks, checkpoints and each round's evaluation) on an in-process grid of the installed ClientApp
(`simulations.inprocess.InProcessGrid`), the ten demo hospitals simulated (node config
`partition-id` only: their SecAgg identities derived as in a simulation, the researcher's
policy; the tiny preset with `--quick`, else the demo preset). Three settings, each its own run
over the same warm sites:

- `plain-default`: the run config's defaults (local DP-SGD, `local-steps` 20 a round);
- `plain-one-step`: the same with `local-steps` 1, the training work of a secure round;
- `secure`: `secure-aggregation = true`: per round four exchanges (`train.secagg_*`) and one
  DP-SGD step per site (clipped gradient sum, noise share, masked).

A round's time is the interval between consecutive round checkpoints (as in
`benchmarks.deployment`: it holds the previous round's evaluation and this round's training);
round 1 is left out (it fills the frozen-feature caches), the median of the others is the
round's time. The full run makes two passes over the settings, the second in reverse order
(the machine's load drifts), and pools their rounds; `--quick` one pass. The key is the
same-work ratio secure / plain-one-step; the ratio against the defaults is reported beside it
(a plain round then does 20 steps of work, a secure one 1).

Where the time goes: the grid delivers messages one at a time in process, so a push's wall time
is the sites' time on those messages (plus a deep copy of each), and the gap until the next push
is the coordinator's work on the replies (for the last exchange of a round also the server
step, checkpoint and history line); `train-seconds` in the replies is the sites' gradient
computation. The protocol's share of a secure round, two ways: its computations (`TIMED`,
wrapped while the run lasts and restored after: the sites' and coordinator's SecAgg sessions,
the sites' identities, quantizing and noise; the server's SGD step on the sum is left out, it
stands in for FedAvg), and the exchanges a plain round has not (stages 1, 2 and 4 at the sites,
the coordinator's gaps after stages 1 to 3). The mask exchange holds the site's usual round work
(model, ledger, one DP step) and is reported by itself.

Bytes: every request and reply's content serialised as Flower sends it
(`flwr.common.serde.recorddict_to_proto(...).ByteSize()`: ArrayRecords, ConfigRecords,
MetricRecords, with their names); requests counted as they are pushed, replies through the
grid's tap. Per site and round: the mean over the measured rounds of a site's bytes.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto

import client.app
import client.secure
import server.secure
from benchmarks.record import Outcome
from benchmarks.workloads import bench_user_config, demo_hospitals
from client.app import app as installed_client_app
from client.state import SiteStates
from common import protocol as R
from common.config import RunConfig
from common.runfolder import RunFolder
from common.secagg.coordinator import CoordinatorSession
from common.secagg.site import SiteSession
from server.app import run_federation
from simulations.inprocess import InProcessGrid

log = logging.getLogger(__name__)

HOSPITALS = 10
PRESETS = {True: "tiny", False: "demo"}  # --quick: tiny; the full run: demo
SETTINGS: dict[str, dict[str, Any]] = {
    "plain-default": {},
    "plain-one-step": {"local-steps": 1},
    "secure": {"secure-aggregation": True},
}
STAGES = tuple(f"train.{s}" for s in (R.SECAGG_KEYS, R.SECAGG_SHARES, R.SECAGG_MASK))
REVEAL = f"train.{R.SECAGG_REVEAL}"


def record_bytes(content: RecordDict) -> int:
    """The bytes of a message's content as Flower serialises it."""
    return int(recorddict_to_proto(content).ByteSize())


def content_bytes(message: Message) -> int:
    """A message's content bytes (0 for an error reply)."""
    return record_bytes(message.content) if message.has_content() else 0


def train_seconds(message: Message) -> float:
    """The `train-seconds` a train or mask reply reports (0 without)."""
    if not message.has_content() or R.METRICS not in message.content.metric_records:
        return 0.0
    return float(message.content.metric_records[R.METRICS].get(R.TRAIN_SECONDS, 0.0))


# what the stopwatch times: (owner, attribute names); nested calls count once, in the outermost
TIMED: tuple[tuple[object, tuple[str, ...]], ...] = (
    (SiteSession, ("__init__", "advertise", "share", "mask", "reveal", "dump", "load")),
    (
        CoordinatorSession,
        ("__init__", "collect_keys", "collect_shares", "collect_masked", "collect_reveals"),
    ),
    (client.secure, ("identity", "pack", "_noise")),
    (server.secure.ServerStep, ("apply",)),
)


class Stopwatch:
    """Times the secure protocol's own computations: (end time, name, seconds) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, float]] = []
        self._depth = threading.local()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self.calls.append((time.time(), name, time.perf_counter() - start))

        return timed

    @contextmanager
    def running(self) -> Iterator[Stopwatch]:
        """Wrap every TIMED attribute while inside (restored after, also on an error)."""
        saved: list[tuple[object, str, object]] = []
        try:
            for owner, names in TIMED:
                label = getattr(owner, "__name__", str(owner)).rsplit(".", 1)[-1]
                for attr in names:
                    static = inspect.getattr_static(owner, attr)
                    saved.append((owner, attr, static))
                    if isinstance(static, classmethod):
                        wrapped: object = classmethod(self.wrap(f"{label}.{attr}", static.__func__))
                    else:
                        wrapped = self.wrap(f"{label}.{attr}", static)  # type: ignore[arg-type]
                    setattr(owner, attr, wrapped)
            yield self
        finally:
            for owner, attr, static in reversed(saved):
                setattr(owner, attr, static)


@dataclass
class Push:
    """One push: a group of messages of one type, delivered and answered in turn."""

    kind: str
    start: float
    end: float
    download: dict[int, int]  # node -> request bytes
    upload: dict[int, int] = field(default_factory=dict)  # node -> reply bytes
    train_seconds: float = 0.0  # the sites' gradient computation its replies report


class MeteredGrid(InProcessGrid):
    """The in-process grid, timing each push and counting each message's bytes."""

    def __init__(self, node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> None:
        super().__init__(installed_client_app, node_configs, run_config, tap=self._reply)
        self.pushes: list[Push] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        group = list(messages)
        kinds = {m.metadata.message_type for m in group}
        push = Push(
            kind=",".join(sorted(kinds)),
            start=time.time(),
            end=0.0,
            download={m.metadata.dst_node_id: content_bytes(m) for m in group},
        )
        self.pushes.append(push)
        ids = super().push_messages(group)
        push.end = time.time()
        return ids

    def _reply(self, node: int, reply: Message) -> None:
        push = self.pushes[-1]
        push.upload[node] = content_bytes(reply)
        push.train_seconds += train_seconds(reply)


@dataclass(frozen=True)
class Setting:
    """One setting's run: its round times (rounds 2..N) and what went on in them."""

    name: str
    round_s: list[float]
    per_round: list[dict[str, float]]  # per measured round: seconds by part
    bytes_per_site: dict[str, dict[str, float]]  # message type -> upload / download per round

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s)


def measure(
    work: Path, name: str, user_config: dict[str, Any], rounds: int, run_name: str
) -> Setting:
    """Run one setting; split each measured round's time into its pushes and the gaps."""
    config = {**user_config, "run-name": run_name, "num-server-rounds": rounds}
    grid = MeteredGrid([{"partition-id": i} for i in range(HOSPITALS)], config)
    with Stopwatch().running() as watch:
        folder = RunFolder(run_federation(grid, RunConfig.from_user_config(config)))
    summary = folder.read_summary()
    if summary.status != "completed":
        raise RuntimeError(f"setting {name}: {summary.status}: {summary.message}")
    marks = [folder.round_checkpoint(r).stat().st_mtime for r in range(1, rounds + 1)]
    pushes = grid.pushes
    per_round: list[dict[str, float]] = []
    sizes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for lo, hi in itertools.pairwise(marks):
        parts: dict[str, float] = defaultdict(float)
        parts["round"] = hi - lo
        inside = [i for i, p in enumerate(pushes) if lo < p.start <= hi]
        for i in inside:
            p = pushes[i]
            parts[f"sites {p.kind}"] += p.end - p.start
            parts[f"train-seconds {p.kind}"] += p.train_seconds
            if i + 1 < len(pushes):
                parts[f"coordinator after {p.kind}"] += pushes[i + 1].start - p.end
            sizes[p.kind]["download"].append(sum(p.download.values()) / HOSPITALS)
            sizes[p.kind]["upload"].append(sum(p.upload.values()) / HOSPITALS)
        for end, what, seconds in watch.calls:
            if lo < end <= hi:
                parts[f"compute {what}"] += seconds
        per_round.append(dict(parts))
    bytes_per_site = {
        kind: {way: statistics.mean(v) for way, v in ways.items()} for kind, ways in sizes.items()
    }
    setting = Setting(name, [r["round"] for r in per_round], per_round, bytes_per_site)
    log.info("secagg_overhead %s: rounds %s", run_name, setting.round_s)
    return setting


def merged(runs: list[Setting]) -> Setting:
    """One setting's runs (passes) as one: their measured rounds pooled."""
    kinds = {k: ways for r in runs for k, ways in r.bytes_per_site.items()}
    return Setting(
        runs[0].name,
        [t for r in runs for t in r.round_s],
        [p for r in runs for p in r.per_round],
        {
            kind: {way: statistics.mean(r.bytes_per_site[kind][way] for r in runs) for way in ways}
            for kind, ways in kinds.items()
        },
    )


def protocol_exchanges_s(parts: dict[str, float]) -> float:
    """A secure round's exchanges that a plain round has not: stages 1, 2 and 4 at the sites, the
    coordinator's work on the replies of stages 1 to 3 (stage 4's: in `protocol_compute_s`)."""
    own = sum(parts.get(f"sites {k}", 0.0) for k in (*STAGES[:2], REVEAL))
    return own + sum(parts.get(f"coordinator after {k}", 0.0) for k in STAGES)


def protocol_compute_s(parts: dict[str, float]) -> float:
    """The protocol's own computations in a round, at the sites and the coordinator (`TIMED`,
    the server's SGD step on the sum left out: it stands in for a plain round's FedAvg)."""
    return sum(
        v for k, v in parts.items() if k.startswith("compute ") and k != "compute ServerStep.apply"
    )


def _median_parts(setting: Setting) -> dict[str, float]:
    keys = sorted({k for r in setting.per_round for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in setting.per_round) for k in keys}


def _total_bytes(setting: Setting, way: str, evaluate: bool = True) -> float:
    return sum(
        v[way]
        for kind, v in setting.bytes_per_site.items()
        if evaluate or not kind.startswith("evaluate")
    )


def run(quick: bool, work: Path) -> Outcome:
    """Three runs over the same ten warm sites; the key is secure / plain-one-step."""
    scale, rounds, passes = (0.05, 3, 1) if quick else (0.2, 6, 2)
    preset = PRESETS[quick]
    demo_hospitals(work / "data", HOSPITALS, size_scale=scale)
    # every site warm in this one process, as a simulation's workers keep theirs (the default
    # bound, 8 a worker, would rebuild a site at every one of a secure round's four messages)
    # (restored after: the runner's later benchmarks share this process)
    warm = max(HOSPITALS, client.app.SITES.max_sites)
    sites, client.app.SITES = client.app.SITES, SiteStates(max_sites=warm)
    base = bench_user_config(
        preset,
        data_root=str(work / "data"),
        state_root=str(work / "state"),
        output_dir=str(work / "outputs"),
    )
    runs: dict[str, list[Setting]] = defaultdict(list)
    try:
        # passes in alternating order (the machine's load drifts): plain, one step, secure, then
        # secure, one step, plain
        for i in range(passes):
            order = list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                config = {**base, **SETTINGS[name]}
                runs[name].append(measure(work, name, config, rounds, f"{name}-{i + 1}"))
    finally:
        client.app.SITES = sites
    results = {name: merged(runs[name]) for name in SETTINGS}
    plain, one, secure = (results[n] for n in SETTINGS)
    same_work = secure.median_round_s / one.median_round_s
    default = secure.median_round_s / plain.median_round_s
    parts = {n: _median_parts(s) for n, s in results.items()}
    secure_parts = parts["secure"]
    protocol = statistics.median(protocol_compute_s(r) for r in secure.per_round)
    exchanges = statistics.median(protocol_exchanges_s(r) for r in secure.per_round)
    raw: dict[str, Any] = {
        "settings": {
            n: {
                "changes": SETTINGS[n],
                "round_s": s.round_s,
                "median_round_s": s.median_round_s,
                "median_parts_s": parts[n],
                "per_round_parts_s": s.per_round,
                "bytes_per_site_per_round": s.bytes_per_site,
                "upload_bytes_per_site_per_round": _total_bytes(s, "upload"),
                "download_bytes_per_site_per_round": _total_bytes(s, "download"),
                "upload_bytes_per_site_per_round_train_only": _total_bytes(s, "upload", False),
                "download_bytes_per_site_per_round_train_only": _total_bytes(s, "download", False),
            }
            for n, s in results.items()
        },
        "secagg_round_overhead_ratio": same_work,
        "secagg_round_time_ratio_default": default,
        "secure_protocol_compute_s_median": protocol,
        "secure_protocol_compute_fraction": protocol / secure.median_round_s,
        "secure_protocol_exchanges_s_median": exchanges,
        "secure_protocol_exchanges_fraction": exchanges / secure.median_round_s,
        "secure_round_minus_one_step_s": secure.median_round_s - one.median_round_s,
    }
    print(_table(results, secure_parts, protocol, exchanges), flush=True)
    return Outcome(
        key="secagg_round_overhead_ratio",
        value=same_work,
        target="<= 1.5",
        note=f"median round time (rounds 2..{rounds} of {passes} run(s) each) with secure "
        "aggregation over plain rounds of the same training work (local-steps 1, local DP-SGD), "
        f"{HOSPITALS} simulated {preset}-preset demo hospitals in process; "
        "secagg_round_time_ratio_default: over plain rounds as the defaults train (local-steps "
        "20, so not the same work); bytes per site and round and the protocol's share of a "
        "secure round in raw",
        settings={
            "preset": preset,
            "hospitals": HOSPITALS,
            "rounds": rounds,
            "passes": passes,
            "measured_rounds": passes * (rounds - 1),
            "data_scale": scale,
            "grid": "simulations.inprocess.InProcessGrid, sites served in turn in one process",
            "warm_sites": warm,
            "settings": SETTINGS,
            "bytes": "flwr.common.serde.recorddict_to_proto(content).ByteSize() per message",
        },
        raw=raw,
        extra={"secagg_round_time_ratio_default": (default, "<= 1.5")},
    )


def _table(
    results: dict[str, Setting], secure_parts: dict[str, float], protocol: float, exchanges: float
) -> str:
    lines = [
        f"{'setting':<16}{'round s':>9}{'up B/site':>12}{'down B/site':>13}"
        f"{'up train':>11}{'down train':>12}   (bytes per site per round; train: no evaluate)"
    ]
    for name, s in results.items():
        lines.append(
            f"{name:<16}{s.median_round_s:>9.3f}{_total_bytes(s, 'upload'):>12.0f}"
            f"{_total_bytes(s, 'download'):>13.0f}{_total_bytes(s, 'upload', False):>11.0f}"
            f"{_total_bytes(s, 'download', False):>12.0f}"
        )
    plain, one, secure = (results[n] for n in SETTINGS)
    lines.append(
        f"same work (secure / plain-one-step): {secure.median_round_s / one.median_round_s:.2f}; "
        f"vs defaults (secure 1 step / plain 20 steps): "
        f"{secure.median_round_s / plain.median_round_s:.2f}"
    )
    lines.append(
        f"secure round, median s: protocol computations {protocol:.3f} "
        f"({protocol / secure.median_round_s:.0%}), exchanges of stages 1, 2, 4 {exchanges:.3f} "
        f"({exchanges / secure.median_round_s:.0%}); by part (sites: a push, in turn; "
        "coordinator: until the next push; compute: the protocol's calls):"
    )
    lines.extend(f"  {k:<50}{v:>9.3f}" for k, v in secure_parts.items() if v >= 0.0005)
    return "\n".join(lines)
