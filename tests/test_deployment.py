"""A real federation on Flower's deployment engine, on loopback: TLS, SuperNode auth, `flwr run`.

One SuperLink (TLS + `--enable-supernode-auth`) on a free port, two registered hospitals'
SuperNodes, each with its own data, state directory and policy, and a 2-round `tiny` run
submitted with `flwr run`. The negative tests (an unregistered key, a SuperNode without TLS)
run while that run is in flight; the run must still complete. Credentials come from
`tools.certs`, exactly as `fedfusion certs` writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.runfolder import RunFolder
from simulations.demo_data import write_demo_hospitals
from tests.local_federation import (
    Processes,
    Started,
    base_env,
    executable,
    flwr_json,
    free_port,
    port_open,
)
from tools.certs import CredentialLayout, write_credentials

pytestmark = pytest.mark.slow  # about 1.5 min: real processes, each ClientApp a fresh Python

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedfusion-test"
HOSPITALS = {"hospital-a": 8.0, "hospital-b": 6.0}  # name: the max-epsilon in its own policy
ROUNDS = 2
START_TIMEOUT = 60.0  # seconds for the SuperLink to listen / the SuperNodes to come online
RUN_TIMEOUT = 240.0  # seconds for the whole 2-round run (about 60 s on 2 busy cores)
REFUSED_TIMEOUT = 60.0  # seconds for a refused SuperNode to give up and exit


@dataclass
class Federation:
    """The running federation and what the tests check afterwards."""

    procs: Processes = field(repr=False)
    tmp: Path
    superlink: Started
    port: int
    supernodes: list[Started]
    run: Started
    run_started: float
    creds: CredentialLayout
    output_dir: Path
    state_dirs: dict[str, Path]
    cli_env: dict[str, str] = field(repr=False)


def _write_coordinator_config(flwr_home: Path, port: int, ca_cert: Path) -> None:
    """The coordinator's `flwr` connection to the SuperLink: TLS, trusting our CA."""
    flwr_home.mkdir(parents=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca_cert}"\n')


def _nodes(env: dict[str, str], cwd: Path) -> list[dict]:
    return flwr_json(["supernode", "list", CONNECTION], env, cwd).get("nodes", [])


def _online_nodes(env: dict[str, str], cwd: Path) -> list[dict]:
    return [n for n in _nodes(env, cwd) if n.get("status") == "online"]


def _start_supernode(procs: Processes, name: str, tmp: Path, superlink_port: int,
                     tls_and_key: list[str], node_config: str) -> Started:
    argv = [executable("flower-supernode"), *tls_and_key, "--superlink", f"127.0.0.1:{superlink_port}",
            "--port", str(free_port()), "--node-config", node_config]
    return procs.start(name, argv, base_env(tmp / name / "flwr-home"), tmp)


def _start_superlink(procs: Processes, creds: CredentialLayout, tmp: Path) -> tuple[Started, int]:
    """The SuperLink with TLS and SuperNode authentication on a free loopback port."""
    port = free_port()
    superlink = procs.start("superlink", [
        executable("flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
        "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ], base_env(tmp / "superlink-home"), tmp)
    procs.wait_until("the SuperLink to listen", lambda: port_open(port), START_TIMEOUT, [superlink])
    return superlink, port


def _start_hospitals(procs: Processes, creds: CredentialLayout, tmp: Path,
                     port: int) -> tuple[list[Started], dict[str, Path]]:
    """One SuperNode per hospital, each with its own data, state folder, policy and key."""
    manifests = write_demo_hospitals(tmp / "data", len(HOSPITALS), seed=0, size_scale=0.1)
    supernodes, state_dirs = [], {}
    for (name, max_eps), manifest in zip(HOSPITALS.items(), manifests, strict=True):
        policy = tmp / name / "policy.toml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(f"max-epsilon = {max_eps}\n")
        state_dirs[name] = tmp / name / "state"
        node_config = (f"manifest='{manifest}' state-dir='{state_dirs[name]}' policy='{policy}' "
                       f"site-name='{name}'")
        supernodes.append(_start_supernode(procs, name, tmp, port, [
            "--root-certificates", str(creds.ca_cert),
            "--auth-supernode-private-key", str(creds.node_key(name))], node_config))
    return supernodes, state_dirs


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Federation:
    """SuperLink + 2 registered SuperNodes over TLS, and a submitted 2-round run."""
    tmp = tmp_path_factory.mktemp("deployment")
    procs = Processes(tmp / "logs")
    request.addfinalizer(procs.stop_all)  # also when the setup below fails half-way
    creds = CredentialLayout(tmp / "creds")
    write_credentials(creds.root, sans=["localhost", "127.0.0.1"], hospitals=list(HOSPITALS))
    superlink, port = _start_superlink(procs, creds, tmp)

    cli_env = base_env(tmp / "coordinator-home")
    _write_coordinator_config(tmp / "coordinator-home", port, creds.ca_cert)
    for name in HOSPITALS:
        answer = flwr_json(["supernode", "register", str(creds.node_public_key(name)), CONNECTION,
                            "--name", name], cli_env, tmp)
        assert answer.get("success"), f"registering {name}: {answer}\n{procs.report()}"
    supernodes, state_dirs = _start_hospitals(procs, creds, tmp, port)
    procs.wait_until("both SuperNodes online", lambda: len(_online_nodes(cli_env, tmp)) == 2,
                     START_TIMEOUT, [superlink, *supernodes])

    # No federated evaluation: each phase starts a fresh ClientApp process per site (about 20 s
    # on 2 busy cores); the in-process app tests cover evaluation.
    output_dir = tmp / "outputs"
    run_config = (f"preset='tiny' num-server-rounds={ROUNDS} accountant='rdp' local-epochs=1 "
                  f"output-dir='{output_dir}' run-name='deployment' round-timeout=120.0 "
                  "fraction-evaluate=0.0")
    run = procs.start("flwr-run", [executable("flwr"), "run", str(ROOT), CONNECTION, "--stream",
                                   "--run-config", run_config], cli_env, tmp)
    return Federation(procs, tmp, superlink, port, supernodes, run, time.monotonic(), creds,
                      output_dir, state_dirs, cli_env)


def _assert_federation_unharmed(fed: Federation) -> None:
    nodes = _nodes(fed.cli_env, fed.tmp)
    assert [n.get("status") for n in nodes] == ["online", "online"], \
        f"expected just the 2 registered nodes, online: {nodes}\n{fed.procs.report()}"
    dead = [s.name for s in (fed.superlink, *fed.supernodes) if s.proc.poll() is not None]
    assert not dead, f"{dead} exited\n{fed.procs.report()}"


def test_supernode_with_unregistered_key_is_refused(federation: Federation) -> None:
    fed = federation
    rogue = CredentialLayout(fed.tmp / "rogue-creds")
    write_credentials(rogue.root, sans=[], hospitals=["rogue"], server=False)
    node = _start_supernode(fed.procs, "rogue", fed.tmp, fed.port, [
        "--root-certificates", str(fed.creds.ca_cert),
        "--auth-supernode-private-key", str(rogue.node_key("rogue")),
        "--max-retries", "1", "--max-wait-time", "10"],
        f"manifest='{fed.tmp / 'data'}/hospital-0' state-dir='{fed.tmp / 'rogue-state'}'")
    assert fed.procs.wait_exit(node, REFUSED_TIMEOUT) != 0
    assert "No SuperNode found with the given public key" in fed.superlink.log.read_text(), \
        fed.procs.report()
    _assert_federation_unharmed(fed)


def test_supernode_without_tls_cannot_connect(federation: Federation) -> None:
    fed = federation
    node = _start_supernode(fed.procs, "plaintext", fed.tmp, fed.port, [
        "--insecure", "--max-retries", "1", "--max-wait-time", "10"],
        f"manifest='{fed.tmp / 'data'}/hospital-1' state-dir='{fed.tmp / 'plaintext-state'}'")
    assert fed.procs.wait_exit(node, REFUSED_TIMEOUT) != 0
    assert "could not establish a connection to the SuperLink" in node.log.read_text(), \
        fed.procs.report()
    _assert_federation_unharmed(fed)


def test_two_rounds_over_tls_with_node_auth(federation: Federation) -> None:
    fed = federation
    remaining = RUN_TIMEOUT - (time.monotonic() - fed.run_started)
    assert fed.procs.wait_exit(fed.run, max(remaining, 1.0)) == 0, fed.procs.report()
    runs = flwr_json(["list", CONNECTION], fed.cli_env, fed.tmp).get("runs", [])
    assert [r.get("status") for r in runs] == ["finished:completed"], f"{runs}\n{fed.procs.report()}"

    run_dir = fed.output_dir / "deployment"
    history = RunFolder(run_dir).read_history()
    assert [h.round for h in history] == list(range(1, ROUNDS + 1))
    for h in history:
        assert set(h.sites) == set(HOSPITALS), h
        assert not h.refusals and not h.failures, h
    assert RunFolder(run_dir).read_summary().status == "completed"
    # each site trained under its own policy file, read through its --node-config
    for name, max_eps in HOSPITALS.items():
        assert max_eps - 0.5 < history[-1].sites[name].train["epsilon"] <= max_eps + 1e-9
        assert (fed.state_dirs[name] / "ledger.json").is_file()
