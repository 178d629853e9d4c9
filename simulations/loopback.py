"""Flower's deployment engine on this machine's loopback: processes with logs, bounded waits, clean
stops. For the deployment tests and the deployment benchmark (and for trying a deployment
locally).

Every process starts in its own session (process group) with its output in a log file, and
`stop_all` ends the group and every descendant, also those Flower detaches into new sessions
(the SuperExec processes that start ServerApps and ClientApps).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.certs import CredentialLayout, write_credentials

# The venv's executables (flower-superlink, flwr, ...) sit next to its python: no PATH lookup.
BIN = Path(sys.executable).parent
_ACCESS_LOG = re.compile(r'"(GET|POST) /')


class LoopbackError(RuntimeError):
    """A process of the loopback federation did not do what was waited for; the logs say why."""


def executable(name: str) -> str:
    """The path of one of Flower's executables in this interpreter's environment."""
    path = BIN / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: install FedFusion into this venv (`make install`)."
        )
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, this venv first, nothing phoned home."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # Flower starts flower-superexec / flwr-clientapp / flwr-serverapp through PATH
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, without the HTTP access lines that fill it."""
    if not path.exists():
        return "(no log)"
    kept = [
        ln for ln in path.read_text(errors="replace").splitlines() if not _ACCESS_LOG.search(ln)
    ]
    return "\n".join(kept[-lines:])


@dataclass
class Started:
    """One process started by a test, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Processes:
    """The processes of one test federation."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Started:
        """Start `argv` in a new session, stdout and stderr into `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def report(self) -> str:
        """Each process' exit status and log tail, for a failure message."""
        parts = []
        for s in self.started:
            status = "running" if s.proc.poll() is None else f"exit code {s.proc.returncode}"
            parts.append(f"--- {s.name} ({status}), {s.log} ---\n{log_tail(s.log)}")
        return "\n".join(parts)

    def wait_exit(self, started: Started, timeout: float) -> int:
        """Wait for one process to end; fail with every log tail after `timeout` seconds."""
        try:
            return started.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LoopbackError(
                f"{started.name} still running after {timeout:.0f} s.\n{self.report()}"
            ) from None

    def wait_until(
        self,
        what: str,
        ready: Callable[[], bool],
        timeout: float,
        must_live: Sequence[Started] = (),
    ) -> None:
        """Poll `ready` until true; fail early if a `must_live` process ends, or after `timeout`."""
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [s.name for s in must_live if s.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                raise LoopbackError(f"Waiting for {what}: {why}.\n{self.report()}")
            time.sleep(0.5)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every started process, its process group and all its descendants."""
        victims: list[psutil.Process] = []
        for s in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                victims += psutil.Process(s.proc.pid).children(recursive=True)
        for s in reversed(self.started):  # SuperNodes before the SuperLink
            if s.proc.poll() is None:
                _signal_group(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s in self.started:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=5)
        kill_survivors(victims, grace=max(0.1, deadline - time.monotonic()))


def kill_survivors(victims: list[psutil.Process], *, grace: float) -> None:
    """Wait up to `grace` seconds for `victims` to exit, then SIGKILL those still alive."""
    _, alive = psutil.wait_procs(victims, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (also in other sessions)."""
    try:
        victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _signal_group(pid, signal.SIGKILL)
    kill_survivors(victims, grace=0.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # start_new_session: the group id is the leader's pid


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def flwr_json(
    argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> dict[str, Any]:
    """Run a `flwr ... --format json` command; its JSON answer (fail with its output if none)."""
    out = subprocess.run(
        [executable("flwr"), *argv, "--format", "json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    start = out.stdout.find("{")
    try:
        answer: dict[str, Any] = json.loads(out.stdout[start:]) if start >= 0 else {}
        return answer
    except json.JSONDecodeError as err:
        raise LoopbackError(
            f"flwr {' '.join(argv)} printed no JSON ({err}):\n{out.stdout}\n{out.stderr}"
        ) from err


# --- a whole federation: a TLS SuperLink and hospitals (SuperNode in process isolation + node) ---

CONNECTION = "fedfusion-loopback"
START_TIMEOUT = 60.0  # seconds for the SuperLink to listen / the SuperNodes to come online


def hospital_supernode(creds: CredentialLayout, name: str, isolation: str, port: int) -> list[str]:
    """A hospital's flower-supernode options: TLS to the SuperLink, its registered key, its
    runtime on loopback at `port`, the given isolation."""
    return [
        "--root-certificates",
        str(creds.ca_cert),
        "--auth-supernode-private-key",
        str(creds.node_key(name)),
        "--isolation",
        isolation,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@dataclass
class LoopbackFederation:
    """A real federation on loopback: TLS, SuperNode authentication, one node per hospital.

    `root` holds the credentials, logs, state folders and outputs; `app` is the FedFusion
    checkout whose installed code the nodes run (and that `flwr run` submits by default).
    """

    root: Path
    app: Path
    procs: Processes = field(init=False)
    superlink: Started | None = None
    port: int = 0
    state_dirs: dict[str, Path] = field(default_factory=dict)
    nodes: dict[str, Started] = field(default_factory=dict)
    node_argv: dict[str, list[str]] = field(default_factory=dict)
    cli_env: dict[str, str] = field(default_factory=dict, repr=False)
    database: Path | None = None  # the SuperLink's state file (`--database`); None: in memory
    superlink_argv: list[str] = field(default_factory=list, repr=False)
    node_options: str = ""  # more of every hospital's node config ("max-message-mb=16 ...")
    node_ids: dict[str, int] = field(default_factory=dict)  # hospital: the id registration gave
    supernodes: dict[str, Started] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.procs = Processes(self.root / "logs")
        self.creds = self.root / "creds"
        self.output_dir = self.root / "outputs"

    def start(self, manifests: dict[str, Path], policies: dict[str, str]) -> None:
        """The SuperLink, then per hospital its key, SuperNode, node; wait until all are online."""
        self._start_coordinator(list(manifests))
        for name, manifest in manifests.items():
            self.join(name, manifest, policies.get(name), wait=False)
        self.procs.wait_until(
            "every SuperNode online",
            lambda: len(self.online_nodes()) == len(manifests),
            START_TIMEOUT,
            [self._running_superlink(), *self.nodes.values()],
        )

    def start_plain(self, names: list[str], env: dict[str, str] | None = None) -> None:
        """The SuperLink and per name a SuperNode that runs each task with Flower's own runner
        (`--isolation subprocess`: a `flwr-clientapp` process per task), no FedFusion node.

        `env`: more environment for the SuperNodes and the runners they start.
        """
        self._start_coordinator(names)
        creds = CredentialLayout(self.creds)
        for name in names:
            self._register(name, name)
            self.supernodes[name] = self.start_supernode(
                f"{name}-supernode", hospital_supernode(creds, name, "subprocess", free_port()), env
            )
        self.procs.wait_until(
            "every SuperNode online",
            lambda: len(self.online_nodes()) == len(names),
            START_TIMEOUT,
            [self._running_superlink(), *self.supernodes.values()],
        )

    def _start_coordinator(self, hospitals: list[str]) -> None:
        """Credentials for the SuperLink and `hospitals`, the SuperLink, the coordinator's CLI."""
        creds = CredentialLayout(self.creds)
        write_credentials(creds.root, sans=["localhost", "127.0.0.1"], hospitals=hospitals)
        self.port = free_port()
        self.superlink_argv = [
            executable("flower-superlink"),
            "--ssl-ca-certfile",
            str(creds.ca_cert),
            "--ssl-certfile",
            str(creds.server_cert),
            "--ssl-keyfile",
            str(creds.server_key),
            "--enable-supernode-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            *(["--database", str(self.database)] if self.database else []),
        ]
        self.start_superlink("superlink")
        home = self.root / "coordinator-home"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{creds.ca_cert}"\n'
        )
        self.cli_env = base_env(home)

    def join(
        self,
        name: str,
        manifest: Path,
        policy_text: str | None = None,
        *,
        registered_as: str | None = None,
        wait: bool = True,
    ) -> int:
        """A new key pair, registered through the Control API (as anyone reaching its port can,
        under `registered_as`, default `name`), and its hospital started; its node id."""
        self._register(name, registered_as or name)
        self._start_hospital(name, manifest, policy_text, CredentialLayout(self.creds))
        if wait:
            self.procs.wait_until(
                f"{name} online",
                lambda: self.node_ids[name] in {int(n["node-id"]) for n in self.online_nodes()},
                START_TIMEOUT,
                [self._running_superlink(), self.nodes[name]],
            )
        return self.node_ids[name]

    def _register(self, name: str, registered_as: str) -> None:
        """`name`'s key pair (made if missing), registered through the Control API."""
        creds = CredentialLayout(self.creds)
        if not creds.node_key(name).exists():
            write_credentials(creds.root, sans=[], hospitals=[name], server=False)
        answer = flwr_json(
            [
                "supernode",
                "register",
                str(creds.node_public_key(name)),
                CONNECTION,
                "--name",
                registered_as,
            ],
            self.cli_env,
            self.root,
        )
        if not answer.get("success"):
            raise LoopbackError(f"registering {name}: {answer}\n{self.procs.report()}")
        self.node_ids[name] = int(answer["node-id"])

    def leave(self, name: str) -> None:
        """Stop a hospital's node and SuperNode, and unregister its key."""
        for started in (self.nodes.pop(name), self.supernodes.pop(name)):
            kill_tree(started.proc.pid)
        flwr_json(
            ["supernode", "unregister", str(self.node_ids.pop(name)), CONNECTION],
            self.cli_env,
            self.root,
        )

    def start_superlink(self, label: str) -> Started:
        """Start the SuperLink (its log: `<label>.log`) and wait until it listens."""
        self.superlink = self.procs.start(
            label, self.superlink_argv, base_env(self.root / "superlink-home"), self.root
        )
        self.procs.wait_until(
            "the SuperLink to listen", lambda: port_open(self.port), START_TIMEOUT, [self.superlink]
        )
        return self.superlink

    def _running_superlink(self) -> Started:
        """The SuperLink `start_superlink` started."""
        if self.superlink is None:
            raise LoopbackError("the SuperLink is not started.")
        return self.superlink

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything it started (the ServerApp): a crash of its host."""
        assert self.superlink is not None
        kill_tree(self.superlink.proc.pid)
        self.superlink.proc.wait(timeout=10)

    def _start_hospital(
        self, name: str, manifest: Path, policy_text: str | None, creds: CredentialLayout
    ) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        secret = folder / "superexec.secret"
        secret.write_bytes(os.urandom(32))
        self.state_dirs[name] = folder / "state"
        # secure aggregation: the hospital signs with its SuperNode key; the consortium's roster
        # is every hospital's public key, one per line (appended as each joins)
        roster = self.root / "roster.pub"
        with roster.open("ab") as fh:
            fh.write(creds.node_public_key(name).read_bytes().rstrip(b"\n") + b"\n")
        node_config = (
            f"manifest='{manifest}' state-dir='{self.state_dirs[name]}' "
            f"site-name='{name}' device='cpu' secagg-identity='{creds.node_key(name)}' "
            f"secagg-roster='{roster}' {self.node_options}"
        ).strip()
        if policy_text is not None:
            (folder / "policy.toml").write_text(policy_text)
            node_config += f" policy='{folder / 'policy.toml'}'"
        runtime_port = free_port()
        self.supernodes[name] = self.start_supernode(
            f"{name}-supernode",
            [
                *hospital_supernode(creds, name, "process", runtime_port),
                "--superexec-auth-secret-file",
                str(secret),
            ],
        )
        self.node_argv[name] = [
            sys.executable,
            "-m",
            "tools",
            "node",
            "--supernode",
            f"127.0.0.1:{runtime_port}",
            "--superexec-auth-secret-file",
            str(secret),
            "--node-config",
            node_config,
        ]
        self.start_node(name)

    def start_supernode(
        self, name: str, extra: list[str], env: dict[str, str] | None = None
    ) -> Started:
        """A flower-supernode process connecting to this SuperLink (`env`: more environment)."""
        argv = [executable("flower-supernode"), *extra, "--superlink", f"127.0.0.1:{self.port}"]
        environment = {**base_env(self.root / name / "flwr-home"), **(env or {})}
        return self.procs.start(name, argv, environment, self.root)

    def start_node(self, name: str, label: str = "node") -> Started:
        """(Re)start a hospital's FedFusion node, running the checkout's installed code."""
        env = {**base_env(self.root / name / "flwr-home"), "PYTHONPATH": str(self.app)}
        self.nodes[name] = self.procs.start(f"{name}-{label}", self.node_argv[name], env, self.app)
        return self.nodes[name]

    def nodes_listed(self) -> list[dict[str, Any]]:
        """The SuperLink's SuperNodes, as `flwr supernode list` reports them."""
        answer = flwr_json(["supernode", "list", CONNECTION], self.cli_env, self.root)
        nodes: list[dict[str, Any]] = answer.get("nodes", [])  # JSON: as flwr prints it
        return nodes

    def online_nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes online now."""
        return [n for n in self.nodes_listed() if n.get("status") == "online"]

    def submit(self, name: str, run_config: str, app: Path | None = None) -> Started:
        """`flwr run` of `app` (default: the checkout) with run-name `name`, outputs in the root."""
        return self.procs.start(
            f"flwr-run-{name}",
            [
                executable("flwr"),
                "run",
                str(app or self.app),
                CONNECTION,
                "--stream",
                "--run-config",
                f"output-dir='{self.output_dir}' run-name='{name}' {run_config}",
            ],
            self.cli_env,
            self.root,
        )

    def finish(self, run: Started, name: str, timeout: float) -> Path:
        """Wait for a submitted run; its run folder (which must hold a summary)."""
        if (
            self.procs.wait_exit(run, timeout) != 0
            or not (self.output_dir / name / "summary.json").is_file()
        ):
            raise LoopbackError(f"run {name} did not complete.\n{self.procs.report()}")
        return self.output_dir / name

    def stop(self) -> None:
        """Stop every process of the federation."""
        self.procs.stop_all()
