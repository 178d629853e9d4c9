"""A real federation on Flower's deployment engine, on loopback, as a hospital runs it.

One SuperLink (TLS + `--enable-supernode-auth`) on a free port; two registered hospitals, each a
`flower-supernode --isolation process` (it runs no app code) and a `fedfusion node` that serves
its tasks with the FedFusion installed here, each with its own data, state folder and policy.
Runs are submitted with `flwr run`, one after the other:
1. from a **tampered copy** of the app (its ClientApp writes a marker file and skips DP): the
   marker never appears, the sites train with DP under their own policies, and the coordinator's
   history matches the sites' receipts;
2. from a bundle of **another publisher**: every node refuses it, no site data is read;
3. with a run config that names another **device, split and data root**: the sites keep theirs;
4. with a **node killed mid-round** and restarted: the round fails cleanly for that site, the run
   goes on, and the ledger never under-counts what left the site;
5. from a copy whose ServerApp adds a **128 MB array** to every round message (a message bomb):
   every node refuses it from the message's object tree, unpacked, and its peak memory stays put;
6. with a **rogue node** whose key was registered through the open Control API under a real
   hospital's name: a run that pins `site-nodes` never sends it anything and records it.
The negative connection tests (an unregistered key, a SuperNode without TLS) run during run 1.
Credentials come from `common.certs`, exactly as `fedfusion certs` writes them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from common import protocol as R
from common.certs import CredentialLayout, write_credentials
from common.privacy.audit import audit
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from simulations.demo_data import write_demo_hospitals
from simulations.loopback import CONNECTION, LoopbackFederation, Started, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("deployment"),
]  # about 4 min: real processes, a 60 s task timeout in run 4

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = {"hospital-a": 8.0, "hospital-b": 6.0}  # name: the max-epsilon in its own policy
RUN_TIMEOUT = 240.0  # seconds for one run
REFUSED_TIMEOUT = 60.0  # seconds for a refused SuperNode to give up and exit
MARKER = "TAMPERED_CLIENTAPP_RAN"
TINY = "preset='tiny' accountant='rdp' round-timeout=120.0"
MAX_MESSAGE_MB = 16  # each hospital's node config: honest tiny-preset messages are ~100 KB
BOMB_MB = 128  # the array a malicious ServerApp adds to every round message


def tampered_app(dest: Path, *, publisher: str = "fedfusion", marker: Path | None = None) -> Path:
    """A copy of this app folder; with `marker`, its ClientApp writes it and sends no DP update."""
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(
        (ROOT / "pyproject.toml")
        .read_text()
        .replace('publisher = "fedfusion"', f'publisher = "{publisher}"')
    )
    shutil.copy(ROOT / "README.md", dest / "README.md")
    for package in ("common", "client", "server", "tools"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    if marker is not None:
        (dest / "client" / "app.py").write_text(f'''
"""A tampered ClientApp: it would run at a hospital that ran the coordinator's bundle."""
from pathlib import Path
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    with Path({str(marker)!r}).open("a") as fh:  # ... or read the manifest and send the rows
        fh.write("tampered ClientApp ran at " + str(context.node_config) + "\\n")
    arrays = msg.content["arrays"]
    return Message(RecordDict({{"arrays": arrays, "metrics": MetricRecord({{"num-examples": 1}})}}),
                   reply_to=msg)
''')
    return dest


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> LoopbackFederation:
    """SuperLink + 2 registered hospitals (SuperNode + node) over TLS."""
    tmp = tmp_path_factory.mktemp("deployment")
    fed = LoopbackFederation(tmp, ROOT, node_options=f"max-message-mb={MAX_MESSAGE_MB}")
    request.addfinalizer(fed.stop)  # also when the setup below fails half-way
    manifests = write_demo_hospitals(tmp / "data", len(HOSPITALS), seed=0, size_scale=0.1)
    # per-run caps: the module runs several runs on the same data
    policies = {
        name: f'max-epsilon = {eps}\nbudget-scope = "run"\nmin-eval-records = 5\n'
        for name, eps in HOSPITALS.items()
    }
    fed.start(dict(zip(HOSPITALS, manifests, strict=True)), policies)
    return fed


@pytest.fixture(scope="module")
def tampered_run(federation: LoopbackFederation) -> Started:
    """Run 1, from a tampered copy of the app (the connection tests run while it is under way).

    No federated evaluation in it: that is covered in-process and in runs 3 and 4.
    """
    app = tampered_app(federation.root / "tampered", marker=federation.root / MARKER)
    return _submit(
        federation, "tampered", app, "num-server-rounds=2 local-epochs=1 fraction-evaluate=0.0"
    )


@pytest.fixture(scope="module")
def tampered_folder(federation: LoopbackFederation, tampered_run: Started) -> RunFolder:
    """Run 1, finished: a test that reads the nodes' logs or run 1's record waits for it here,
    whatever order the tests run in."""
    return _finish(federation, tampered_run, "tampered")


def _submit(fed: LoopbackFederation, name: str, app: Path, run_config: str) -> Started:
    return fed.submit(name, f"{TINY} {run_config}", app)


def _finish(fed: LoopbackFederation, run: Started, name: str) -> RunFolder:
    return RunFolder(fed.finish(run, name, RUN_TIMEOUT))


def _assert_federation_unharmed(fed: LoopbackFederation) -> None:
    nodes = [n for n in fed.nodes_listed() if n.get("status") != "unregistered"]
    assert [n.get("status") for n in nodes] == ["online", "online"], (
        f"expected just the 2 registered nodes, online: {nodes}\n{fed.procs.report()}"
    )
    dead = [s.name for s in (fed.superlink, *fed.nodes.values()) if s.proc.poll() is not None]
    assert not dead, f"{dead} exited\n{fed.procs.report()}"


def _own_port() -> list[str]:
    """A free runtime port: Flower's default (9094) may be another test's SuperNode's."""
    return ["--host", "127.0.0.1", "--port", str(free_port())]


def test_supernode_with_unregistered_key_is_refused(
    federation: LoopbackFederation, tampered_run: Started
) -> None:
    fed = federation
    rogue = CredentialLayout(fed.root / "rogue-creds")
    write_credentials(rogue.root, sans=[], hospitals=["rogue"], server=False)
    node = fed.start_supernode(
        "rogue",
        [
            "--root-certificates",
            str(CredentialLayout(fed.creds).ca_cert),
            "--auth-supernode-private-key",
            str(rogue.node_key("rogue")),
            "--max-retries",
            "1",
            "--max-wait-time",
            "10",
            *_own_port(),
        ],
    )
    assert fed.procs.wait_exit(node, REFUSED_TIMEOUT) != 0
    assert "No SuperNode found with the given public key" in fed.superlink.log.read_text(), (
        fed.procs.report()
    )
    _assert_federation_unharmed(fed)


def test_supernode_without_tls_cannot_connect(
    federation: LoopbackFederation, tampered_run: Started
) -> None:
    fed = federation
    node = fed.start_supernode(
        "plaintext", ["--insecure", "--max-retries", "1", "--max-wait-time", "10", *_own_port()]
    )
    assert fed.procs.wait_exit(node, REFUSED_TIMEOUT) != 0
    assert "could not establish a connection to the SuperLink" in node.log.read_text(), (
        fed.procs.report()
    )
    _assert_federation_unharmed(fed)


def test_a_tampered_bundle_never_runs_at_a_hospital(
    federation: LoopbackFederation, tampered_run: Started, tampered_folder: RunFolder
) -> None:
    fed, folder = federation, tampered_folder
    assert not (fed.root / MARKER).exists(), (fed.root / MARKER).read_text()
    history = folder.read_history()
    assert [h.round for h in history] == [1, 2] and folder.read_summary().status == "completed"
    run_key = folder.read_settings().run_key
    for name, max_eps in HOSPITALS.items():
        assert not history[-1].refusals and not history[-1].failures, history[-1]
        # DP training under the site's own policy, as its receipts show
        receipts = [r for r in read_receipts(fed.state_dirs[name]) if r.run_id == run_key]
        assert [r.round for r in receipts] == [1, 2] and all(r.steps > 0 for r in receipts)
        assert max_eps - 0.5 < receipts[-1].epsilon <= max_eps + 1e-9
        assert history[-1].sites[name].train[R.EPSILON] == pytest.approx(receipts[-1].epsilon)
        # what the coordinator received is what the site recorded sending
        assert [h.sites[name].update_sha256 for h in history] == [r.update_sha256 for r in receipts]
        # the hospital's own log: each round's spend, this round's and the run's, and what is left
        spends = re.findall(
            rf"{name}: run {run_key} \(Flower run \d+\) round (\d): \d+ DP-SGD steps; "
            r"epsilon ([\d.]+) this round, ([\d.]+) this run \(cap [\d.]+\); .*, ([\d.]+) left",
            fed.nodes[name].log.read_text(),
        )
        assert [int(r) for r, *_ in spends] == [1, 2], spends
        for (_, _, this_run, _), receipt in zip(spends, receipts, strict=True):
            assert float(this_run) == pytest.approx(receipt.epsilon, abs=1e-3)
        assert float(spends[1][1]) == pytest.approx(
            receipts[1].epsilon - receipts[0].epsilon, abs=2e-3
        )
    # the coordinator's view: `flwr run --stream` shows each round's table and how the run ended
    stream = tampered_run.log.read_text(errors="replace")
    for server_round in (1, 2):
        assert re.search(
            rf"round {server_round}\nsite +loss +accuracy +auroc +epsilon +cap +train n", stream
        ), stream
    assert re.search(r"(?m)^hospital-a +- +- +- +[\d.]+ +8\.00 +\d+", stream), stream
    assert f"run completed; run folder {folder.path}: All 2 rounds completed." in stream, stream
    _assert_federation_unharmed(fed)


def _log_after(started: Started, offset: int) -> str:
    return started.log.read_text(errors="replace")[offset:]


def test_a_bundle_of_another_publisher_is_refused_at_every_node(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    fed = federation
    offsets = {n: s.log.stat().st_size for n, s in fed.nodes.items()}
    app = tampered_app(fed.root / "evil", publisher="evilcorp")
    run = fed.procs.start(  # `fedfusion run`: `flwr run --stream` that exits by the run's status
        "fedfusion-run-evil",
        [
            sys.executable,
            "-m",
            "tools",
            "run",
            str(app),
            CONNECTION,
            "--run-config",
            f"output-dir='{fed.output_dir}' run-name='evil' {TINY} num-server-rounds=1",
        ],
        fed.cli_env,
        fed.root,
    )
    assert fed.procs.wait_exit(run, RUN_TIMEOUT) == 1, fed.procs.report()
    folder = RunFolder(fed.output_dir / "evil")  # written before the run failed
    (line,) = folder.read_history()
    assert set(line.refusals) == set(HOSPITALS) and not line.sites, line
    assert all("bundle-not-accepted" in reason for reason in line.refusals.values())
    assert folder.read_summary().status == "stopped"
    last = run.log.read_text(errors="replace").strip().splitlines()[-1]
    assert re.fullmatch(
        r"run \d+: finished:failed: ServerApp failed with exception: The run stopped early: "
        r"Round 1: 0 site\(s\) sent a usable update, fewer than min-nodes=2\. .*",
        last,
    ), last
    run_key = folder.read_settings().run_key
    for name, node in fed.nodes.items():
        assert load_ledger(fed.state_dirs[name]).run(run_key) is None  # nothing charged
        log = _log_after(node, offsets[name])
        assert "refusing run" in log and "evilcorp/fedfusion" in log
        assert "train / " not in log and "feature cache" not in log  # no site data was read


def test_the_run_config_cannot_move_a_site_off_its_node_config(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    fed = federation
    offsets = {n: s.log.stat().st_size for n, s in fed.nodes.items()}
    overrides = (
        f"num-server-rounds=1 local-epochs=1 device='cuda' val-fraction=0.9 "
        f"data-root='{fed.root / 'nowhere'}' state-root='{fed.root / 'elsewhere'}'"
    )
    folder = _finish(fed, _submit(fed, "overrides", ROOT, overrides), "overrides")
    (line,) = folder.read_history()
    assert line.finished and set(line.sites) == set(HOSPITALS), line
    first = tampered_folder.read_history()[0]
    for name, node in fed.nodes.items():
        # its own split (val-fraction 0.2, not 0.9), data and state folder; trained on the CPU
        assert line.sites[name].train[R.NUM_EXAMPLES] == first.sites[name].train[R.NUM_EXAMPLES]
        assert "device='cuda' is not used" in _log_after(node, offsets[name]).replace('"', "'")
    assert not (fed.root / "elsewhere").exists() and not (fed.root / "nowhere").exists()


def test_a_secure_round_with_a_cohort_below_the_sites_minimum_gets_nothing(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    """The coordinator asks the 2 hospitals for a secure round; each hospital's policy needs a
    cohort of 3 (min-secagg-sites, default). Real processes over TLS: each hospital signs with
    its SuperNode key against the consortium's roster, but here refuses at stage 1: no key, no
    share, no masked vector leaves it, and nothing is charged."""
    fed = federation
    offsets = {n: s.log.stat().st_size for n, s in fed.nodes.items()}
    folder = _finish(
        fed,
        _submit(fed, "secure", ROOT, "num-server-rounds=1 secure-aggregation=true"),
        "secure",
    )
    (line,) = folder.read_history()
    assert folder.read_summary().status == "stopped" and not line.sites, line
    assert set(line.refusals) == set(HOSPITALS), line
    assert all("secagg-unsafe" in reason for reason in line.refusals.values()), line
    run_key = folder.read_settings().run_key
    for name, node in fed.nodes.items():
        assert load_ledger(fed.state_dirs[name]).run(run_key) is None  # nothing charged
        assert "a cohort of 2 sites; the site's policy needs 3" in _log_after(node, offsets[name])
    _assert_federation_unharmed(fed)


def test_a_node_killed_mid_round_never_under_counts(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    fed = federation
    name = "hospital-a"
    node = fed.nodes[name]
    offset = node.log.stat().st_size
    # uncached epochs, so a round lasts long enough to be interrupted
    run = _submit(
        fed,
        "killed",
        ROOT,
        "num-server-rounds=3 local-epochs=12 local-steps=0 min-nodes=1 "
        "fraction-evaluate=0.0 feature-cache=false",
    )
    fed.procs.wait_until(
        f"{name} training round 2",
        lambda: re.search(r"round 2 train epoch \d+/12", _log_after(node, offset)) is not None,
        RUN_TIMEOUT,
        [node, run],
    )
    os.kill(node.proc.pid, signal.SIGKILL)  # mid-round: no reply, whatever it had written stays
    node.proc.wait(10)
    fed.start_node(name, label="node-restarted")
    folder = _finish(fed, run, "killed")
    history = folder.read_history()
    assert [h.round for h in history] == [1, 2, 3]
    assert name in history[1].failures  # the SuperNode reported the task's process gone
    assert history[2].sites[name].train is not None  # the restarted node served round 3
    run_key = folder.read_settings().run_key
    receipts = {r.update_sha256 for r in read_receipts(fed.state_dirs[name]) if r.run_id == run_key}
    sent = [h.sites[name].update_sha256 for h in history if name in h.sites]
    assert set(sent) <= receipts  # every update that left the site was charged
    assert audit(fed.state_dirs[name]).ok  # ledger and receipts agree


def bomb_app(dest: Path, megabytes: int) -> Path:
    """A copy of this app whose ServerApp adds a `megabytes` MB array to every round message.

    Its chunks are all alike (Flower sends such a chunk once): cheap for the SuperLink and the
    SuperNodes, but a node that unpacked the message would join it into the whole array.
    """
    app = tampered_app(dest)
    server_app = app / "server" / "app.py"
    text = server_app.read_text().replace(
        "    arrays = ArrayRecord(trainable_state(model))\n",
        "    arrays = ArrayRecord(trainable_state(model))\n"
        f"    arrays['bomb'] = Array(__import__('numpy')"
        f".full({megabytes} * 2**18, 7.0, 'float32'))\n",
    )
    server_app.write_text(
        text.replace(  # and it saves its model without the bomb
            "dict(end.arrays.to_torch_state_dict())",
            "{k: v for k, v in end.arrays.to_torch_state_dict().items() if k != 'bomb'}",
        )
    )
    return app


def _peak_rss(started: Started) -> int:
    """A process' peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{started.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_a_message_bomb_is_refused_unpacked_and_memory_stays_put(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    fed = federation  # every node has served an honest round (run 1, finished)
    offsets = {n: s.log.stat().st_size for n, s in fed.nodes.items()}
    peaks = {n: _peak_rss(s) for n, s in fed.nodes.items()}
    app = bomb_app(fed.root / "bomb", BOMB_MB)
    folder = _finish(fed, _submit(fed, "bomb", app, "num-server-rounds=1 local-epochs=1"), "bomb")
    (line,) = folder.read_history()
    assert set(line.refusals) == set(HOSPITALS) and not line.sites, line
    assert all("message-too-large" in reason for reason in line.refusals.values())
    run_key = folder.read_settings().run_key
    for name, node in fed.nodes.items():
        assert load_ledger(fed.state_dirs[name]).run(run_key) is None  # nothing charged
        assert "the round message is too large" in _log_after(node, offsets[name])
        grown = _peak_rss(node) - peaks[name]
        assert grown < BOMB_MB * 2**20 / 8, f"{name}'s node peaked {grown / 2**20:.0f} MB higher"
    _assert_federation_unharmed(fed)


def test_a_rogue_node_registered_through_the_control_api_takes_no_part(
    federation: LoopbackFederation, tampered_folder: RunFolder
) -> None:
    fed = federation
    (data,) = write_demo_hospitals(fed.root / "rogue-data", 1, seed=7, size_scale=0.1)
    # the attack: anyone who reaches the Control API registers a key, here under a real name
    rogue = fed.join("rogue", data, registered_as="hospital-a")
    try:
        pinned = ",".join(f"{fed.node_ids[name]}={name}" for name in HOSPITALS)
        folder = _finish(
            fed,
            _submit(
                fed,
                "pinned",
                ROOT,
                f"num-server-rounds=1 local-epochs=1 fraction-evaluate=0.0 site-nodes='{pinned}'",
            ),
            "pinned",
        )
        (line,) = folder.read_history()
        assert line.finished and set(line.sites) == set(HOSPITALS), line
        assert {s: e.node_id for s, e in line.sites.items()} == {
            n: fed.node_ids[n] for n in HOSPITALS
        }
        assert "not among the run's site-nodes" in line.rejected[f"node {rogue}"]
        assert "task done" not in fed.nodes["rogue"].log.read_text()  # it was sent nothing
    finally:
        fed.leave("rogue")
    _assert_federation_unharmed(fed)
