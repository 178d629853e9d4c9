"""The node against Flower's real SuperNode Runtime API app, in process (no sockets).

These tests pin the Flower internals `client/flower_runtime.py` relies on: when a Flower upgrade
changes them, they fail here first. The SuperNode's FastAPI app (`flwr.supernode.main.create_app`)
is driven through Starlette's TestClient, an httpx.Client, swapped into the runtime client.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import types
from pathlib import Path

import flwr
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import Status, SubStatus
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.constant import PULL_MAX_TIME, TASK_TOKEN_HEADER, TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import (
    HEAD_BODY_DIVIDER,
    HEAD_VALUE_DIVIDER,
    get_object_id,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectUnavailableError,
    inflate_object_from_contents,
)
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.start_client_internal import _insert_message

from client import flower_runtime as runtime
from client import node as hospital
from client.bundle import AcceptanceRule, BundleIdentity, installed_version
from common import protocol as R
from common.config import RunConfig
from common.errors import Kind, public_text
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from common.privacy.ledger import load_ledger
from tests.conftest import round_config, tiny_user_config

ROOT = Path(__file__).resolve().parent.parent
# starlette warns about its own httpx use on every request of the in-process SuperNode app
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NODE_ID, RUN_ID, SERIES_ID = 4242, 777, 9


def test_the_flower_internals_the_node_uses_are_there() -> None:
    assert flwr.__version__.startswith(runtime.FLOWER_MINOR + ".")
    assert TaskType.CLIENT_APP == "flwr-clientapp" and TASK_TOKEN_HEADER == "flwr-task-token"
    for name in (
        "AcquireTask",
        "SendTaskHeartbeat",
        "PullTaskInput",
        "PullMessages",
        "PullObject",
        "ConfirmMessageReceived",
        "PushMessages",
        "PushObject",
        "PushTaskOutput",
    ):
        assert callable(getattr(RuntimeHttpClient, name)), name


def _app_copy(tmp_path: Path, publisher: str = "fedfusion") -> Path:
    """A bundle-able copy of this app (its pyproject and packages), with its publisher set."""
    app = tmp_path / f"app-{publisher}"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        text.replace('publisher = "fedfusion"', f'publisher = "{publisher}"')
    )
    (app / "README.md").write_text("copy\n")
    for package in ("client", "server", "common"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


class SuperNode:
    """A SuperNode's state with one run and its bundle, and its Runtime API app."""

    def __init__(self, app_dir: Path, run_config: dict) -> None:
        self.factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.factory.state()
        self.state.set_node_id(NODE_ID)
        content = build_fab_from_disk(app_dir)
        self.fab_hash = hashlib.sha256(content).hexdigest()
        identity = BundleIdentity.of(content)
        run = Run.create_empty(RUN_ID)
        run.fab_id, run.fab_version = f"{identity.publisher}/{identity.name}", identity.version
        run.fab_hash, run.series_id = self.fab_hash, SERIES_ID
        run.status = RunStatus(Status.RUNNING, "", "")
        self.state.store_run(run)
        self.state.store_fab(Fab(self.fab_hash, content, {}))  # re-checks the SHA-256
        self.state.set_run_series_context(
            SERIES_ID,
            Context(
                run_id=RUN_ID,
                node_id=NODE_ID,
                node_config={"from": "the supernode"},
                state=RecordDict(),
                run_config=run_config,
                series_id=SERIES_ID,
            ),
        )
        self.app = create_app(state_factory=self.factory)

    def enqueue(self, content: RecordDict, kind: str, server_round: int) -> int:
        """A message for the node and its ClientApp task (as the SuperNode stores them)."""
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
        msg = Message(content, dst_node_id=NODE_ID, message_type=kind, group_id=str(server_round))
        _insert_message(msg, self.state, self.state.object_store)
        return self.state.create_task(
            task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=self.fab_hash
        )

    def take_reply(self) -> Message:
        """The reply the node pushed, with its content (from the SuperNode's object store)."""
        (reply,) = self.state.get_messages_legacy(is_reply=True)
        self.state.delete_messages(message_ids=[reply.metadata.message_id])
        if reply.has_error():
            return reply
        store = self.state.object_store
        tree = store.get_object_tree(reply.metadata.message_id)
        contents = {t.object_id: store.get(t.object_id) for t in iterate_object_tree(tree)}
        full = inflate_object_from_contents(reply.metadata.message_id, contents)
        return full  # type: ignore[return-value]


@pytest.fixture()
def wired(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every runtime client the node makes talks to the in-process SuperNode app."""
    holder: dict = {}
    original = runtime.connect

    def connect(address: str, **kwargs: object) -> RuntimeHttpClient:
        client = original(address, **kwargs)  # the same interceptors as in production
        client._client.close()
        client._client = TestClient(holder["supernode"].app)
        client._base_url = "http://testserver"
        return client

    monkeypatch.setattr(runtime, "connect", connect)
    return holder


def _node(
    demo_root: Path, tmp_path: Path, rule: AcceptanceRule | None = None, **own: object
) -> hospital.Node:
    node_config = {
        "manifest": str(demo_root / "hospital-0"),
        "state-dir": str(tmp_path / "state"),
        "site-name": "st-mary",
        "device": "cpu",
        **own,
    }
    node = hospital.setup(supernode="x", node_config=node_config, secret_file=None)
    if rule is not None:
        node = hospital.Node(supernode="x", node_config=node_config, site=node.site, rule=rule)
    return node


def _round(run_config: dict, server_round: int, **extra: np.ndarray) -> RecordDict:
    model = build_model(RunConfig.from_user_config(run_config).model)
    config = ConfigRecord(
        {**round_config(frozen_fingerprint(model), "run-key-1"), R.SERVER_ROUND: server_round}
    )
    arrays = ArrayRecord(
        {
            **{k: Array(v.numpy()) for k, v in trainable_state(model).items()},
            **{k: Array(v) for k, v in extra.items()},
        }
    )
    return RecordDict({R.ARRAYS: arrays, R.CONFIG: config})


def test_the_node_runs_torch_with_the_threads_its_node_config_sets(
    demo_root: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    try:
        hospital.apply_threads(_node(demo_root, tmp_path, **{"torch-threads": 3}).site)
        assert torch.get_num_threads() == 3
        hospital.apply_threads(_node(demo_root, tmp_path, **{"torch-threads": 0}).site)
        assert torch.get_num_threads() == 3  # 0: torch's own setting, left as it is
        hospital.apply_threads(_node(demo_root, tmp_path).site)
        assert torch.get_num_threads() == 1  # the default: one thread for the site
    finally:
        torch.set_num_threads(before)


def test_the_node_runs_the_installed_app_with_its_own_node_config(
    demo_root: Path, tmp_path: Path, wired: dict
) -> None:
    run_config = tiny_user_config(
        demo_root, num_server_rounds=2, device="cuda", state_root="/nowhere"
    )  # neither may move the site
    wired["supernode"] = supernode = SuperNode(_app_copy(tmp_path), run_config)
    node = _node(demo_root, tmp_path, AcceptanceRule(version=installed_version()))
    for server_round in (1, 2):
        task_id = supernode.enqueue(_round(run_config, server_round), "train", server_round)
        token = runtime.acquire(runtime.connect("x"))
        hospital.run_task(node, token)
        reply = supernode.take_reply()
        assert not reply.has_error(), reply.error
        assert reply.content[R.SITE][R.SITE_NAME] == "st-mary"  # the node's own config was used
        task = supernode.state.get_tasks(task_ids=[task_id])[0]
        assert (task.status.status, task.status.sub_status) == (
            Status.FINISHED,
            SubStatus.COMPLETED,
        )
    assert load_ledger(tmp_path / "state").run("run-key-1").rounds == (1, 2)
    kept = supernode.state.get_run_series_context(SERIES_ID)
    assert kept.node_config == {"from": "the supernode"}  # the node's config stays with the node


def test_a_bundle_from_another_publisher_is_refused_without_reading_data(
    demo_root: Path, tmp_path: Path, wired: dict
) -> None:
    run_config = tiny_user_config(demo_root)
    wired["supernode"] = supernode = SuperNode(_app_copy(tmp_path, "evilcorp"), run_config)
    node = _node(demo_root, tmp_path)
    task_id = supernode.enqueue(_round(run_config, 1), "train", 1)
    hospital.run_task(node, runtime.acquire(runtime.connect("x")))
    reply = supernode.take_reply()
    assert reply.has_error() and reply.error.code == R.ERROR_CODES[Kind.REFUSAL]
    assert reply.error.reason == "site 'st-mary': " + public_text(
        Kind.REFUSAL, "bundle-not-accepted"
    )
    assert supernode.state.get_tasks(task_ids=[task_id])[0].status.sub_status == SubStatus.FAILED
    assert not (tmp_path / "state").exists()  # no ledger, no feature cache: the data was not read


def test_an_allow_list_of_bundle_hashes_decides_alone(tmp_path: Path) -> None:
    content = build_fab_from_disk(_app_copy(tmp_path))
    bundle = BundleIdentity.of(content)
    declared = {
        "declared_hash": bundle.sha256,
        "declared_id": "fedfusion/fedfusion",
        "declared_version": bundle.version,
    }
    assert AcceptanceRule(version=bundle.version).problem(bundle, **declared) is None
    assert "accept-bundles" in AcceptanceRule(hashes=frozenset({"0" * 64})).problem(
        bundle, **declared
    )
    assert AcceptanceRule(hashes=frozenset({bundle.sha256})).problem(bundle, **declared) is None
    assert "does not match" in AcceptanceRule().problem(
        bundle, **{**declared, "declared_hash": "f" * 64}
    )
    assert "is not the FedFusion app" in AcceptanceRule(version="9.9").problem(bundle, **declared)


def test_a_message_bomb_is_refused_before_its_arrays_are_pulled(
    demo_root: Path, tmp_path: Path, wired: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extra 48 MB array in a train message, at a node that unpacks at most 8 MB."""
    run_config = tiny_user_config(demo_root)
    wired["supernode"] = supernode = SuperNode(_app_copy(tmp_path), run_config)
    node = _node(
        demo_root, tmp_path, AcceptanceRule(version=installed_version()), **{"max-message-mb": 8}
    )
    pulled: list[str] = []
    bounded = runtime._bounded_pull

    def spy(client: RuntimeHttpClient, budget: object):
        pull = bounded(client, budget)  # type: ignore[arg-type]
        return lambda request: (pulled.append(request.object_id), pull(request))[1]

    monkeypatch.setattr(runtime, "_bounded_pull", spy)
    content = _round(run_config, 1, bomb=np.full(12 * 2**20, 7.0, np.float32))
    supernode.enqueue(content, "train", 1)
    chunks = {t.object_id for t in iterate_object_tree(get_object_tree(content)) if not t.children}
    hospital.run_task(node, runtime.acquire(runtime.connect("x")))
    reply = supernode.take_reply()
    assert reply.error.code == R.ERROR_CODES[Kind.REFUSAL]
    assert reply.error.reason == "site 'st-mary': " + public_text(Kind.REFUSAL, "message-too-large")
    assert pulled and not chunks & set(pulled)  # the heads only: no chunk of any array
    assert not (tmp_path / "state").exists()  # nothing read, nothing charged
    supernode.enqueue(_round(run_config, 1), "train", 1)  # an honest message: served as ever
    hospital.run_task(node, runtime.acquire(runtime.connect("x")))
    assert not supernode.take_reply().has_error()


def _object(kind: str, children: list[str], body: bytes) -> bytes:
    """An object's bytes as Flower writes them: `<type> <children> <body length>`, the body."""
    head = HEAD_VALUE_DIVIDER.join([kind, ",".join(children), str(len(body))]).encode()
    return head + HEAD_BODY_DIVIDER + body


def test_an_array_that_inflates_beyond_what_it_declares_is_refused_unjoined() -> None:
    """A crafted Array head: 4 floats declared, one 1 KB chunk listed 10,000 times (10 MB)."""
    chunk = _object("ArrayChunk", [], bytes(1024))
    chunk_id = get_object_id(chunk)
    meta = {
        "dtype": "float32",
        "shape": [4],
        "stype": "numpy.ndarray",
        "arraychunk_ids": [0] * 10_000,
    }
    array = _object("Array", [chunk_id], json.dumps(meta).encode())
    contents = {chunk_id: chunk, get_object_id(array): array}
    tree = ObjectTree(object_id=get_object_id(array), children=[ObjectTree(object_id=chunk_id)])
    with pytest.raises(runtime.MessageTooLarge, match="more bytes than it declares"):
        runtime._pull_within(tree, contents.__getitem__, 2**20)
    meta["shape"] = [2**30]  # 4 GB declared: refused before the chunk is pulled
    array = _object("Array", [chunk_id], json.dumps(meta).encode())
    tree = ObjectTree(object_id=get_object_id(array), children=[ObjectTree(object_id=chunk_id)])
    asked: list[str] = []
    pull = {get_object_id(array): array}.__getitem__
    with pytest.raises(runtime.MessageTooLarge, match="none was pulled"):
        runtime._pull_within(tree, lambda i: (asked.append(i), pull(i))[1], 2**20)
    assert asked == [get_object_id(array)]


def test_an_object_not_yet_at_the_supernode_is_retried_at_the_node_pacing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retried after 20 ms, then 40 ms (+-20% jitter), beyond Flower's 500 tries."""
    waits: list[float] = []

    class Recorded(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0.0))
            return False  # not stopped: retry at once, the wait recorded

    fake = types.SimpleNamespace(Event=Recorded, Lock=threading.Lock)
    monkeypatch.setattr(inflatable_utils, "threading", fake)
    answers = iter([None] * 600 + [b"content"])

    def pull(object_id: str) -> bytes:
        answer = next(answers)
        if answer is None:
            raise ObjectUnavailableError(object_id)
        return answer

    assert runtime.paced_pull(["a"], pull) == {"a": b"content"}
    assert len(waits) == 600
    assert 0.016 <= waits[0] <= 0.024 and 0.032 <= waits[1] <= 0.048
    assert max(waits) <= 0.2 * 1.2 and waits[-1] >= 0.2 * 0.8  # capped at 0.2 s
    assert runtime.PULL_PACING.max_time == PULL_MAX_TIME  # Flower's bound on the whole pull


def test_the_node_polls_its_supernode_often_only_while_a_run_is_active() -> None:
    assert hospital.poll_interval(0.0) == hospital.BUSY_POLL_SECONDS == 0.05
    assert hospital.poll_interval(59.9) == 0.05
    assert hospital.poll_interval(60.0) == hospital.IDLE_SECONDS == 0.5


def test_a_site_can_bound_which_run_config_keys_a_run_changes(
    demo_root: Path, tmp_path: Path, wired: dict
) -> None:
    """The bundle's defaults and the submitter's overrides make the run config a site runs."""
    allowed = {
        "preset",
        "accountant",
        "num-server-rounds",
    }  # tiny_user_config changes the first two
    rule = AcceptanceRule(version=installed_version(), run_config_keys=frozenset(allowed))
    changed = tiny_user_config(demo_root, learning_rate=5.0, num_server_rounds=2)
    wired["supernode"] = supernode = SuperNode(_app_copy(tmp_path), changed)
    supernode.enqueue(_round(changed, 1), "train", 1)
    hospital.run_task(_node(demo_root, tmp_path, rule), runtime.acquire(runtime.connect("x")))
    reply = supernode.take_reply()
    assert reply.error.reason == "site 'st-mary': " + public_text(
        Kind.REFUSAL, "run-config-not-accepted"
    )
    assert not (tmp_path / "state").exists()
    assert rule.changed_keys(changed) == ["learning-rate"]
    assert rule.changed_keys(tiny_user_config(demo_root, num_server_rounds=2, device="cuda")) == []
