"""A SuperNode's Runtime API, as the hospital's node uses it: the only module on Flower internals.

A SuperNode started with `--isolation process` runs no app code itself. It queues each task and
waits for a process of the hospital's to take it over the SuperNode's local Runtime API
(protobuf over HTTP, `--host`/`--port`, default 127.0.0.1:9094): acquire the task (a token),
pull its input (the run's context, the run, its bundle, the message), push the reply, push the
task's output (the context to keep). This is what Flower's own `flower-superexec` and
`flwr-clientapp` do in flwr 1.42 (flwr/supernode/runtime/run_clientapp.py); FedFusion's node does
it in one long-lived process and runs its own installed ClientApp instead of the bundle's.

These are private Flower APIs of the pinned minor version (`FLOWER_MINOR`); tests/
test_flower_runtime.py drives them against Flower's real SuperNode app and fails loudly when
they change. Flower's own retry and heartbeat helpers are not used: on a rejected token they
send SIGINT to their own process, which must not stop a node that serves every run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import flwr
from flwr.app import Context, Message
from flwr.app.message import remove_content_from_message
from flwr.common.constant import SubStatus
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    message_to_proto,
    run_from_proto,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    PushAppMessagesRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
    push_objects,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger(__name__)

FLOWER_MINOR = "1.42"  # the Flower version these internals are written for
COMPONENT = "fedfusion-node"
HEARTBEAT_SECONDS = 20.0  # a claimed task's token lives 60 s after each heartbeat
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
COMPLETED, FAILED = SubStatus.COMPLETED, SubStatus.FAILED


def check_flower_version() -> None:
    """Refuse to start on a Flower version whose internals this module was not written for."""
    if not flwr.__version__.startswith(FLOWER_MINOR + "."):
        raise RuntimeError(
            f"FedFusion's node speaks the SuperNode Runtime API of Flower {FLOWER_MINOR}; this "
            f"environment has Flower {flwr.__version__}. Install flwr=={FLOWER_MINOR}.* (as "
            "pyproject.toml pins it).")


def read_secret(path: Path | None) -> bytes | None:
    """The SuperExec shared secret (`--superexec-auth-secret-file` of the SuperNode), if any."""
    return load_superexec_auth_secret(str(path)) if path is not None else None


def connect(address: str, *, secret: bytes | None = None, token: str | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API at `address` (loopback: plain HTTP)."""
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
    if secret:  # signs AcquireTask, so no other local process can take the hospital's tasks
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods={ACQUIRE_METHOD}))
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None,
                                                 interceptors=interceptors,  # type: ignore[arg-type]
                                                 retry_invoker=None)


def acquire(client: RuntimeHttpClient) -> str | None:
    """The token of the oldest waiting ClientApp task, or None when none waits."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None


@dataclass(frozen=True)
class TaskInput:
    """What a task brings: the run's context (its state), the run, its bundle, the message."""

    context: Context
    run: Run
    fab: Fab
    message: Message


class Task:
    """One claimed task: pull its input, push its reply, finish it (heartbeats while it is open)."""

    def __init__(self, address: str, token: str, *, secret: bytes | None = None) -> None:
        self.client = connect(address, secret=secret, token=token)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> Task:
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.close()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    log.warning("the SuperNode no longer holds this task (its token expired)")
                    return
            except Exception as err:  # noqa: BLE001  a missed beat is retried; the TTL is 60 s
                log.warning("heartbeat to the SuperNode failed: %s", err)

    def pull_input(self) -> TaskInput:
        """The task's context, run, bundle and message (the task is then running)."""
        res = self.client.PullTaskInput(PullTaskInputRequest())
        context = context_from_proto(res.context)
        pulled = self.client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("the SuperNode holds no message for this task")
        node, run_id = Node(node_id=context.node_id), context.run_id
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(self.client.PullObject, node, run_id),
            make_confirm_message_received_fn_protobuf(self.client.ConfirmMessageReceived, node,
                                                      run_id),
            return_type=Message)
        message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
        return TaskInput(context=context, run=run_from_proto(res.run), fab=fab_from_proto(res.fab),
                         message=message)

    def push_reply(self, reply: Message, context: Context) -> None:
        """Send the reply message (before `finish`, which revokes the token)."""
        reply.metadata.__dict__["_message_id"] = reply.object_id
        proto = message_to_proto(remove_content_from_message(reply))
        with no_object_id_recompute():
            res = self.client.PushMessages(PushAppMessagesRequest(
                messages_list=[proto], message_object_trees=[get_object_tree(reply)]))
            push_objects(get_all_nested_objects(reply),
                         make_push_object_fn_protobuf(self.client.PushObject,
                                                      Node(node_id=context.node_id),
                                                      run_id=context.run_id,
                                                      session_id=res.session_id),
                         object_ids_to_push=set(res.objects_to_push))

    def finish(self, *, context: Context | None, completed: bool, details: str = "") -> None:
        """End the task; `context` (its state) is kept for the run's next task when given."""
        self.client.PushTaskOutput(PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=COMPLETED if completed else FAILED, details=details))
