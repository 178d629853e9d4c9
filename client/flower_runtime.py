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

A message is untrusted input, and its arrays travel as separate objects (chunks of at most 5 MB,
identical chunks sent once), so no transport limit bounds what unpacking it costs. The node pulls
a message in two steps (`Task.pull_message`): the object tree and the small objects above the
chunks first, whose Array heads declare every array's dtype and shape; only if the declared sizes
fit the site's `max-message-mb` are the chunks pulled, each streamed against a byte budget, and
the chunks each array would inflate to are counted again before anything is inflated.

The SuperNode hands out a task as soon as it has the message's header, while it may still be
pulling the message's objects from the SuperLink; Flower's pull then retries after 1 s, 2 s, 4 s
... (`PULL_INITIAL_BACKOFF`, for pulls across a network). On the SuperNode's loopback the node
retries after 20 ms, doubling to at most 0.2 s (`PULL_PACING`), within Flower's time bound.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flwr
import numpy as np
from flwr.app import Context, Message
from flwr.app.message import remove_content_from_message
from flwr.common.constant import SubStatus
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    message_from_proto,
    message_to_proto,
    run_from_proto,
)
from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
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
from flwr.supercore.constant import PULL_MAX_TIME, TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_head_values_from_object_content,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    pull_objects,
    push_objects,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufRequestContext
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger(__name__)

FLOWER_MINOR = "1.42"  # the Flower version these internals are written for
COMPONENT = "fedfusion-node"
HEARTBEAT_SECONDS = 20.0  # a claimed task's token lives 60 s after each heartbeat
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
PULL_OBJECT = ("/v1/runtime/pull-object", "/flwr.proto.Runtime/PullObject")  # path, RPC method
COMPLETED, FAILED = SubStatus.COMPLETED, SubStatus.FAILED
MAX_OBJECTS = 100_000  # objects in one message (a trainable BERT-base: ~1,000)
HEAD_BYTES = 512  # per object, beside the arrays' bytes: heads, names, a chunk's npy header


@dataclass(frozen=True, kw_only=True)
class PullPacing:
    """How the node retries an object the SuperNode does not hold yet (Flower's `pull_objects`)."""

    initial_backoff: float  # seconds before the first retry, doubled after each
    backoff_cap: float  # the longest wait between two tries
    max_time: float  # seconds for the whole message before the pull fails


# on loopback a retry costs a millisecond: retry often rather than wait 1 s, 2 s, 4 s, ...
PULL_PACING = PullPacing(initial_backoff=0.02, backoff_cap=0.2, max_time=PULL_MAX_TIME)


class MessageTooLarge(Exception):
    """A task's message is larger than the node unpacks; its arrays were not (all) pulled."""


def check_flower_version() -> None:
    """Refuse to start on a Flower version whose internals this module was not written for."""
    if not flwr.__version__.startswith(FLOWER_MINOR + "."):
        raise RuntimeError(
            f"FedFusion's node speaks the SuperNode Runtime API of Flower {FLOWER_MINOR}; this "
            f"environment has Flower {flwr.__version__}. Install flwr=={FLOWER_MINOR}.* (as "
            "pyproject.toml pins it)."
        )


def read_secret(path: Path | None) -> bytes | None:
    """The SuperExec shared secret (`--superexec-auth-secret-file` of the SuperNode), if any."""
    return load_superexec_auth_secret(str(path)) if path is not None else None


def connect(
    address: str, *, secret: bytes | None = None, token: str | None = None
) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API at `address` (loopback: plain HTTP)."""
    # each of the three is an HTTP interceptor; their common base is not in Flower's signature
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
    if secret:  # signs AcquireTask, so no other local process can take the hospital's tasks
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})
        )
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=None,
    )


def acquire(client: RuntimeHttpClient) -> str | None:
    """The token of the oldest waiting ClientApp task, or None when none waits."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None


@dataclass(frozen=True)
class TaskInput:
    """What a task brings: the run's context (its state), the run, its bundle, and its message's
    metadata and object tree (its content is pulled by `Task.pull_message`)."""

    context: Context
    run: Run
    fab: Fab
    message: Message  # metadata only (empty content): enough to reply to
    tree: ObjectTree


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
            except Exception as err:  # a missed beat is retried; the TTL is 60 s
                log.warning("heartbeat to the SuperNode failed: %s", err)

    def pull_input(self) -> TaskInput:
        """The task's context, run, bundle and message header (the task is then running)."""
        res = self.client.PullTaskInput(PullTaskInputRequest())
        context = context_from_proto(res.context)
        pulled = self.client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("the SuperNode holds no message for this task")
        tree = pulled.message_object_trees[0]
        header = message_from_proto(pulled.messages_list[0])
        header.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
        return TaskInput(
            context=context,
            run=run_from_proto(res.run),
            fab=fab_from_proto(res.fab),
            message=header,
            tree=tree,
        )

    def pull_message(self, given: TaskInput, *, max_bytes: int) -> Message:
        """The task's message, if it fits in `max_bytes` (else MessageTooLarge, chunks unpulled).

        Only a message pulled whole is confirmed as received (the SuperNode then drops its
        objects): the SuperNode may still be receiving a refused one from the SuperLink, and
        deleting its objects under it would lose the refusal.
        """
        node, run_id = Node(node_id=given.context.node_id), given.context.run_id
        objects = sum(1 for _ in iterate_object_tree(given.tree))
        budget = _ByteBudget(max_bytes + 2**20 + HEAD_BYTES * min(objects, MAX_OBJECTS))
        pull = make_pull_object_fn_protobuf(_bounded_pull(self.client, budget), node, run_id)
        contents = _pull_within(given.tree, pull, max_bytes)
        make_confirm_message_received_fn_protobuf(self.client.ConfirmMessageReceived, node, run_id)(
            given.tree.object_id
        )
        message = inflate_object_from_contents(given.tree.object_id, contents)
        if not isinstance(message, Message):
            raise TypeError(f"the task's message is a {type(message).__name__}")
        message.metadata.__dict__["_message_id"] = given.tree.object_id
        return message

    def push_reply(self, reply: Message, context: Context) -> None:
        """Send the reply message (before `finish`, which revokes the token)."""
        reply.metadata.__dict__["_message_id"] = reply.object_id
        proto = message_to_proto(remove_content_from_message(reply))
        with no_object_id_recompute():
            res = self.client.PushMessages(
                PushAppMessagesRequest(
                    messages_list=[proto], message_object_trees=[get_object_tree(reply)]
                )
            )
            push_objects(
                get_all_nested_objects(reply),
                make_push_object_fn_protobuf(
                    self.client.PushObject,
                    Node(node_id=context.node_id),
                    run_id=context.run_id,
                    session_id=res.session_id,
                ),
                object_ids_to_push=set(res.objects_to_push),
            )

    def finish(self, *, context: Context | None, completed: bool, details: str = "") -> None:
        """End the task; `context` (its state) is kept for the run's next task when given."""
        self.client.PushTaskOutput(
            PushTaskOutputRequest(
                context=context_to_proto(context) if context is not None else None,
                sub_status=COMPLETED if completed else FAILED,
                details=details,
            )
        )


def _pull_within(
    tree: ObjectTree, pull: Callable[[str], bytes], max_bytes: int
) -> dict[str, bytes]:
    """A message's objects: the heads, then (if their arrays fit `max_bytes`) the chunks.

    Before anything is inflated, every Array must join its chunks into no more bytes than its
    head declares (chunks may repeat: a 1 GB array of zeros travels as one 5 MB chunk).
    """
    nodes = list(iterate_object_tree(tree))
    if len(nodes) > MAX_OBJECTS:
        raise MessageTooLarge(f"the message has {len(nodes):,} objects (at most {MAX_OBJECTS:,}).")
    heads = list(dict.fromkeys(t.object_id for t in nodes if t.children))
    leaves = list(dict.fromkeys(t.object_id for t in nodes if not t.children))
    contents = paced_pull(heads, pull)
    declared = sum(_array_size(c).declared for c in contents.values())
    if declared > max_bytes:
        raise MessageTooLarge(
            f"its arrays declare {declared / 2**20:,.1f} MB, above the node's "
            f"max-message-mb ({max_bytes / 2**20:g} MB); none was pulled."
        )
    contents.update(paced_pull([i for i in leaves if i not in contents], pull))
    sizes = [_array_size(c, contents) for c in contents.values()]  # a head sent as a leaf too
    if any(s.joined > s.declared + HEAD_BYTES * (1 + s.chunks) for s in sizes):
        raise MessageTooLarge(
            "an array would join its chunks into more bytes than it declares; nothing was inflated."
        )
    if sum(s.declared for s in sizes) > max_bytes:
        raise MessageTooLarge("its arrays declare more than the node's max-message-mb.")
    return contents


def paced_pull(
    object_ids: list[str], pull: Callable[[str], bytes], pacing: PullPacing = PULL_PACING
) -> dict[str, bytes]:
    """Flower's `pull_objects`, retrying an object not yet there at the node's `pacing`."""
    return pull_objects(
        object_ids,
        pull,
        initial_backoff=pacing.initial_backoff,
        backoff_cap=pacing.backoff_cap,
        max_time=pacing.max_time,
        max_tries_per_object=None,  # bounded by max_time: short waits take many tries
    )


@dataclass(frozen=True)
class _ArraySize:
    """What an Array head declares, and what its chunks would join into (0 for other objects)."""

    declared: int = 0  # bytes of dtype x shape
    joined: int = 0  # bytes of its chunks, each as often as the head lists it (0: not pulled)
    chunks: int = 0  # chunk references in the head


def _array_size(content: bytes, contents: dict[str, bytes] | None = None) -> _ArraySize:
    """The sizes of an Array object from its head (and its pulled chunks, when given)."""
    kind, children, body_len = get_object_head_values_from_object_content(content)
    if kind != "Array":
        return _ArraySize()
    meta = json.loads(content[len(content) - body_len :])
    shape, refs = meta.get("shape"), meta.get("arraychunk_ids")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(refs, list)
    ):
        raise ValueError(f"an Array head with shape {str(shape)[:40]}")
    declared = math.prod(shape) * np.dtype(str(meta.get("dtype"))).itemsize
    joined = sum(len(contents[children[int(i)]]) for i in refs) if contents is not None else 0
    return _ArraySize(declared=declared, joined=joined, chunks=len(refs))


class _ByteBudget:
    """Bytes the node may still receive for one message (shared by the pulling threads)."""

    def __init__(self, limit: int) -> None:
        self.left, self.lock = limit, threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            self.left -= n
            if self.left < 0:
                raise MessageTooLarge(
                    "its objects are larger than they declare, above the "
                    "node's max-message-mb; the pull was stopped."
                )


def _bounded_pull(
    client: RuntimeHttpClient, budget: _ByteBudget
) -> Callable[[PullObjectRequest], PullObjectResponse]:
    """PullObject, streamed: the response is read against `budget`, never whole at once."""
    path, method = PULL_OBJECT

    def pull(request: PullObjectRequest) -> PullObjectResponse:
        http = client._client.build_request(  # ProtobufClient._unary_unary, streamed
            method="POST",
            url=f"{client._base_url}{path}",
            content=request.SerializeToString(deterministic=True),
            headers={"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE},
        )
        response = client._send(
            ProtobufRequestContext(
                rpc_method=method,
                message=request,
                request=http,
            ),
            stream=True,
        )
        body = bytearray()
        try:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                budget.take(len(chunk))
                body.extend(chunk)
        finally:
            response.close()
        result = PullObjectResponse()
        result.ParseFromString(bytes(body))
        return result

    return pull
