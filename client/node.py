"""`fedfusion node`: the hospital's long-lived process that runs its own FedFusion for every task.

A hospital runs it next to `flower-supernode --isolation process`. For each task the SuperNode
queues, the node takes the task over the SuperNode's local Runtime API (`client.flower_runtime`),
checks the run's bundle against the site's acceptance rule (`client.bundle`), and runs
FedFusion's ClientApp **as installed at the hospital** (`client.app.app`), never code from the
bundle. The site's facts (data, state folder, policy, split, device, model files) are the node's
own `--node-config`: the run config the coordinator sends is parsed and bounded by the site, and
cannot move them. One process serves every round of every run, so the model, the tokenised data
and the frozen-feature cache stay warm (and the feature cache is also on disk in the state
folder, for a restart).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.common.config import parse_config_args

from client import flower_runtime as runtime
from client.app import app as installed_app
from client.app import error_reply
from client.bundle import AcceptanceRule, BundleIdentity, BundleUnreadable
from client.site_config import SiteConfig
from common.errors import ConfigurationError, FedFusionError, Refusal
from common.privacy.policy import SitePolicy, load_policy

log = logging.getLogger(__name__)

DEFAULT_SUPERNODE = "127.0.0.1:9094"  # flower-supernode's default --host/--port
IDLE_SECONDS = 0.5  # between polls of the SuperNode when no task waits
# A run's next task follows within seconds of the last: poll its SuperNode (a local HTTP call)
# every 50 ms for a minute after each task, so a task waits 25 ms for the node, not 250 ms.
BUSY_POLL_SECONDS = 0.05
BUSY_FOR_SECONDS = 60.0
RETRY_SECONDS = 2.0  # after the SuperNode could not be reached


@dataclass(frozen=True, kw_only=True)
class Node:
    """A node's fixed setup: where its SuperNode is, the site it is, what it accepts."""

    supernode: str
    node_config: dict[str, Any]  # the site's own facts, handed to the ClientApp
    site: SiteConfig
    rule: AcceptanceRule
    secret: bytes | None = None  # the SuperNode's --superexec-auth-secret-file


def setup(*, supernode: str, node_config: dict[str, Any], secret_file: Path | None) -> Node:
    """Check the node's configuration and policy before serving anything (fail fast)."""
    runtime.check_flower_version()
    site = SiteConfig.deployed(node_config)
    policy = load_policy(site.policy) if site.policy else SitePolicy()
    return Node(
        supernode=supernode,
        node_config=dict(node_config),
        site=site,
        rule=AcceptanceRule(
            hashes=frozenset(policy.accept_bundles), run_config_keys=site.run_config_keys
        ),
        secret=runtime.read_secret(secret_file),
    )


def apply_threads(site: SiteConfig) -> None:
    """Run torch with the node config's `torch-threads` (0: leave torch's default)."""
    if site.torch_threads:
        torch.set_num_threads(site.torch_threads)
    log.info("site %s: torch runs %d intra-op thread(s)", site.site_name, torch.get_num_threads())


def serve(node: Node, stop: threading.Event) -> None:
    """Take and run the SuperNode's tasks until `stop` is set (a task under way finishes)."""
    poller = runtime.connect(node.supernode, secret=node.secret)
    unreachable = False
    last_task = time.monotonic()  # a run may be waiting for the node to start
    log.info("site %s: serving the SuperNode at %s", node.site.site_name, node.supernode)
    while not stop.is_set():
        try:
            token = runtime.acquire(poller)
        except Exception as err:  # the SuperNode restarts, or is not up yet
            if not unreachable:
                log.warning(
                    "the SuperNode at %s is not reachable (%s); retrying every %.0f s",
                    node.supernode,
                    err,
                    RETRY_SECONDS,
                )
            unreachable = True
            stop.wait(RETRY_SECONDS)
            continue
        if unreachable:
            log.info("the SuperNode at %s is reachable again", node.supernode)
            unreachable = False
        if token is None:
            stop.wait(poll_interval(time.monotonic() - last_task))
        else:
            run_task(node, token)
            last_task = time.monotonic()
    poller.close()


def poll_interval(since_last_task: float) -> float:
    """Seconds to the next poll of the SuperNode, `since_last_task` seconds after the last."""
    return BUSY_POLL_SECONDS if since_last_task < BUSY_FOR_SECONDS else IDLE_SECONDS


def run_task(node: Node, token: str) -> None:
    """One task: pull it, refuse it or run the installed ClientApp on it, push the reply."""
    start = time.perf_counter()
    with runtime.Task(node.supernode, token, secret=node.secret) as task:
        try:
            given = task.pull_input()
        except Exception as err:  # nothing was received: nothing to answer
            log.error("could not pull the task's input from the SuperNode: %s", err)
            task.finish(context=None, completed=False, details="input unavailable")
            return
        refusal = _acceptance_problem(node, given)
        message = _pulled(node, task, given) if refusal is None else refusal
        if isinstance(message, FedFusionError):  # refused before any site data is read
            log.warning(
                "site %s: refusing run %d: %s (no site data is read)",
                node.site.site_name,
                given.run.run_id,
                message.detail,
            )
            task.push_reply(error_reply(given.message, node.site.site_name, message), given.context)
            task.finish(context=None, completed=False, details=message.reason)
            return
        context = Context(
            run_id=given.context.run_id,
            node_id=given.context.node_id,
            node_config=dict(node.node_config),
            state=given.context.state,
            run_config=given.context.run_config,
        )
        reply = _call(node, message, context)
        task.push_reply(reply, given.context)
        kept = Context(
            run_id=given.context.run_id,
            node_id=given.context.node_id,
            node_config=given.context.node_config,
            state=context.state,
            run_config=given.context.run_config,
        )
        task.finish(context=kept, completed=not reply.has_error())
    log.info(
        "site %s: run %d, %s task done in %.1f s%s",
        node.site.site_name,
        given.run.run_id,
        given.message.metadata.message_type,
        time.perf_counter() - start,
        " (error reply)" if reply.has_error() else "",
    )


def _acceptance_problem(node: Node, given: runtime.TaskInput) -> FedFusionError | None:
    """Why the site takes no part in this task's run (its bundle, its run config), or None."""
    try:
        bundle = BundleIdentity.of(given.fab.content)
    except BundleUnreadable as err:
        return Refusal(f"the run's bundle is {err}", reason="bundle-not-accepted")
    log.info("site %s: run %d ships bundle %s", node.site.site_name, given.run.run_id, bundle.label)
    problem = node.rule.problem(
        bundle,
        declared_hash=given.run.fab_hash,
        declared_id=given.run.fab_id,
        declared_version=given.run.fab_version,
    )
    if problem:
        return Refusal(problem, reason="bundle-not-accepted")
    changed = node.rule.changed_keys(given.context.run_config)
    if changed:
        return Refusal(
            f"the run config changes {changed}, which this site's run-config-keys "
            "(node config) does not let a run change.",
            reason="run-config-not-accepted",
        )
    return None


def _pulled(node: Node, task: runtime.Task, given: runtime.TaskInput) -> Message | FedFusionError:
    """The task's message, or why the site refuses it (too large, malformed) unpacked."""
    try:
        return task.pull_message(given, max_bytes=node.site.limits.max_message_bytes)
    except runtime.MessageTooLarge as err:
        return Refusal(f"the round message is too large: {err}", reason="message-too-large")
    except Exception as err:  # a message that does not unpack is malformed input
        return ConfigurationError(
            f"the round message does not unpack ({type(err).__name__}: {err})", reason="message"
        )


def _call(node: Node, message: Message, context: Context) -> Message:
    """The installed ClientApp's reply; a message it can't handle is an error reply, not a crash."""
    try:
        return installed_app(message, context)
    except Exception as err:  # e.g. a message type FedFusion does not serve
        return error_reply(message, node.site.site_name, err)


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="fedfusion node",
        description="The hospital's FedFusion node: serves every task of its SuperNode (started "
        "with --isolation process) with the FedFusion installed here, never code the "
        "coordinator ships.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--supernode",
        default=DEFAULT_SUPERNODE,
        help="the SuperNode's local Runtime API (its --host:--port)",
    )
    p.add_argument(
        "--node-config",
        required=True,
        default=argparse.SUPPRESS,
        help="(required) the site's own settings, as flower-supernode takes them: "
        "\"manifest='/data/manifest.csv' state-dir='/var/lib/fedfusion' "
        "policy='/etc/fedfusion/policy.toml' site-name='st-mary' device='cpu'\", "
        "or a .toml file",
    )
    p.add_argument(
        "--superexec-auth-secret-file",
        type=Path,
        default=None,
        help="the secret file the SuperNode was started with "
        "(--superexec-auth-secret-file), so no other local process can take its "
        "tasks; None: the SuperNode has no secret",
    )
    p.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    return p


def main(argv: list[str]) -> int:
    """Run the node until SIGTERM or SIGINT; exit 2 on a bad configuration."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of the SuperNode
    try:
        node = setup(
            supernode=args.supernode,
            node_config=parse_config_args([args.node_config]),
            secret_file=args.superexec_auth_secret_file,
        )
    except (FedFusionError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    apply_threads(node.site)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the task under way", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve(node, stop)
    return 0
