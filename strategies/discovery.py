"""Discovery: which node holds which task.

Node ids are random per run, so before the first round the strategy asks every node which task it holds
(a ``query`` message), checks the answers, and names each node for the records by a stable label.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from strategies.replies import MalformedReply, first_line, read_query_answer
from tasks.spec import TaskInfo


class FederationError(RuntimeError):
    """The federation cannot run as configured (missing nodes, conflicting tasks)."""


@dataclass(frozen=True)
class NodeTask:
    node_id: int
    name: str
    role: str  # "contributing" or "heldout"
    info: TaskInfo
    entry: str  # JSON pool entry, echoed back to the node in every message
    site: str = ""  # how the node names itself (its site, state or data directory, or partition)
    label: str = ""  # how records name this node: the task, or task#i when several nodes hold the task


def label_nodes(nodes: Iterable[NodeTask]) -> list[NodeTask]:
    """Name every node for the records: its task, or ``task#i`` (i = 1, 2, ... in the order of the nodes'
    site names) when several nodes hold the task, so that nothing keyed by the label collides and the
    sampling order does not depend on the random node ids."""
    by_task: dict[str, list[NodeTask]] = {}
    for node in nodes:
        by_task.setdefault(node.name, []).append(node)
    labelled = []
    for task, group in sorted(by_task.items()):
        if len(group) == 1:
            labelled.append(replace(group[0], label=task))
            continue
        group.sort(key=lambda n: (n.site, n.node_id))
        if len({n.site for n in group}) < len(group):
            log(WARNING, "Nodes %s hold task '%s' with the same site name %s: their order (and so the sampling) "
                "depends on random node ids; give each site its own node config 'site'",
                [n.node_id for n in group], task, sorted({n.site for n in group}))
        labelled += [replace(n, label=f"{task}#{i}") for i, n in enumerate(group, start=1)]
    return labelled


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Node ids once ``expected`` nodes are connected; FederationError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() >= deadline:
            raise FederationError(
                f"only {len(node_ids)} of the {expected} expected nodes connected within {timeout:.0f}s "
                "(federation.expected_nodes / federation.node_wait_timeout_s)"
            )
        time.sleep(poll)


def check_consistent_tasks(nodes: Iterable[NodeTask]) -> None:
    """Two nodes may hold the same task only if they agree on its definition (labels, pair-ness)."""
    seen: dict[str, NodeTask] = {}
    for node in nodes:
        other = seen.setdefault(node.name, node)
        if other.info != node.info:
            raise FederationError(
                f"nodes {other.node_id} and {node.node_id} claim incompatible definitions of task "
                f"'{node.name}': {other.info} vs {node.info}"
            )
        if other.role != node.role:
            raise FederationError(f"nodes {other.node_id} and {node.node_id} give task '{node.name}' "
                                  f"different roles: {other.role} vs {node.role}")


def discover_nodes(grid: Grid, pool: list[dict[str, Any]], expected: int, wait_timeout: float, timeout: float,
                   query_config: Mapping[str, Any], body_signature: str | None) -> dict[int, NodeTask]:
    """Wait for ``expected`` nodes, then ask each which task it holds (a ``query`` message carrying the pool).

    A node that does not answer, answers with an error, or answers something malformed is a problem; the run
    fails at discovery with every problem listed. So does a node whose model body differs from the server's
    (``body_signature``) and two nodes that disagree on a task's definition.
    """
    node_ids = wait_for_nodes(grid, expected, wait_timeout)
    content = RecordDict({"config": ConfigRecord({"pool": json.dumps(pool), **query_config})})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    roles = {entry["name"]: entry.get("role", "contributing") for entry in pool}
    found, problems, answered = [], [], set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        answered.add(node_id)
        if reply.has_error():
            problems.append(f"node {node_id}: {first_line(reply.error.reason)}")
            continue
        try:
            answer = read_query_answer(reply)
            info = TaskInfo.from_json(answer.info_json)
        except (MalformedReply, ValueError, KeyError, TypeError) as exc:
            problems.append(f"node {node_id}: malformed answer to the task query: {first_line(str(exc))}")
            continue
        if answer.role not in ("", "contributing", "heldout"):
            problems.append(f"node {node_id} ({info.name}): unknown role {answer.role!r}")
            continue
        if body_signature and answer.signature and answer.signature != body_signature:
            problems.append(f"node {node_id} ({info.name}): its model's body does not match the server's "
                            f"(layout digest {answer.signature} != {body_signature}); check model settings and caches")
        role = answer.role or roles.get(info.name, "contributing")
        found.append(NodeTask(node_id, info.name, role, info, answer.entry, answer.site))
    missing = [n for n in node_ids if n not in answered]
    if missing:
        problems.append(f"{len(missing)} node(s) did not answer the task query in {timeout:.0f}s "
                        f"(federation.discovery_timeout_s): {missing[:5]}")
    if problems:
        raise FederationError("task discovery failed: " + "; ".join(problems))
    check_consistent_tasks(found)
    nodes = {n.node_id: n for n in label_nodes(found)}
    by_role = {r: sorted(n.label for n in nodes.values() if n.role == r) for r in ("contributing", "heldout")}
    log(INFO, "Discovered %d nodes: %d contributing, %d held out %s", len(nodes),
        len(by_role["contributing"]), len(by_role["heldout"]), by_role["heldout"])
    for node in sorted(nodes.values(), key=lambda n: n.label):
        if node.label != node.name:
            log(INFO, "  %s is node %d (site %s)", node.label, node.node_id, node.site or "unnamed")
    return nodes
