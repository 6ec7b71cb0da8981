"""The ColD Fusion strategy: sample contributors, fuse their bodies uniformly, redistribute.

Each round: K contributors (sampled with a seeded RNG among the nodes holding contributing tasks)
receive the current body, finetune body + their own head, and send back the body; the strategy fuses
the valid bodies with a uniform mean (``strategies.fusion.uniform_mean``) into the next base. Then
the nodes score the new base on their tasks in the evaluation views that are due this round (linear
probe and full finetuning, each on its own schedule; ``app.learning.views``): contributing ("seen") and
held-out ("unseen") tasks alike.

Node ids are random, so the strategy first asks every node which task it holds (a ``query`` message).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from statistics import mean
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from tasks.metrics import primary
from strategies.fusion import get_operator
from strategies.schedule import VIEWS, due
from strategies.replies import MalformedReply, read_evaluate_reply, read_query_answer, read_train_reply
from strategies.validation import Contribution, assert_finite, screen
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


PRIMARY_METRICS = {"accuracy", "pearson"}  # tasks.metrics.primary reads one of these

# Score series of a round record: (record field, view it comes from, prefix of its metrics in that view).
# The probe view scores two poolings in one pass; the first-token probe is the paper's ColD-Frozen view.
SERIES = {"probe": ("probe", ""), "probe_mean_pool": ("probe", "mean_pool_"), "finetune": ("finetune", "")}


@dataclass
class RoundRecord:
    """Everything that happened in one round; one line of ``metrics.jsonl``.

    Contributors are named by label (``NodeTask.label``: the task, or ``task#i`` when several nodes hold
    one task); scores are per task (the mean over the task's nodes that answered).
    """

    round: int
    contributors: list[str] = field(default_factory=list)
    fused_contributors: list[str] = field(default_factory=list)  # the contributions that entered the fusion
    train_loss: dict[str, float] = field(default_factory=dict)  # well-formed replies only (finite by then)
    train_examples: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "label: reason": error, malformed and missing replies
    rejections: list[str] = field(default_factory=list)  # "label (node n): reason": contributions failing validation
    notes: list[str] = field(default_factory=list)  # checks that could not be applied, and why
    heads_fresh: list[str] = field(default_factory=list)  # head_policy=keep: contributors whose head started fresh
    update_norms: dict[str, float] = field(default_factory=dict)  # L2 norm of each well-formed update
    fused: bool = False
    rolled_back: bool = False  # back-tracking undid this round's fusion
    base_round: int = 0  # the round whose fusion produced the base in effect after this round (0: the start model)
    roles: dict[str, str] = field(default_factory=dict)  # task -> contributing ("seen") | heldout ("unseen")
    # Per score series (SERIES): each task's primary score (accuracy, Pearson r for regression) and the
    # means over the classification tasks of each role (regression is left out of the means, as in the paper).
    probe: dict[str, float] = field(default_factory=dict)
    probe_contributing: float | None = None
    probe_heldout: float | None = None
    probe_mean_pool: dict[str, float] = field(default_factory=dict)
    probe_mean_pool_contributing: float | None = None
    probe_mean_pool_heldout: float | None = None
    finetune: dict[str, float] = field(default_factory=dict)
    finetune_contributing: float | None = None
    finetune_heldout: float | None = None
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # view -> task -> every metric
    few_shot: int | None = None  # held-out tasks trained on this many examples in the views
    seconds_train: float = 0.0
    seconds_eval: float = 0.0


def monitored_score(history: Iterable[Mapping[str, Any]], monitor: str) -> float | None:
    """The back-tracking reference after ``history``: the monitored probe mean of the current base, i.e. of
    the last round that was not rolled back (a rolled-back round's score describes a base that was undone)."""
    scores = [r.get(f"probe_{monitor}") for r in history if not r.get("rolled_back")]
    scores = [s for s in scores if s is not None]
    return scores[-1] if scores else None


def fused_norms(history: Iterable[Mapping[str, Any]]) -> list[float]:
    """Update norms of the contributions fused in the last fused round (validation's reference norms)."""
    for record in reversed(list(history)):
        if record.get("fused"):
            norms = record.get("update_norms") or {}
            return [float(norms[c]) for c in record.get("fused_contributors") or [] if c in norms]
    return []


class ColdFusion(FedAvg):
    """Uniform-mean fusion of contributor bodies, with task discovery and per-task evaluation."""

    def __init__(
        self,
        *,
        pool: list[dict[str, Any]],
        contributors_per_round: int | None = 8,  # None: every contributing task, every round
        min_contributions: int = 1,
        seed: int = 0,
        expected_nodes: int | None = None,
        node_wait_timeout: float = 120.0,
        discovery_timeout: float | None = None,  # None: the ``timeout`` given to ``start``
        train_timeout: float | None = None,
        eval_timeout: float | None = None,
        eval_schedule: dict[str, int | str | None] | None = None,
        finetune_roles: Iterable[str] = ("contributing", "heldout"),
        few_shot: int | None = None,
        eval_start: bool = True,
        fusion: str = "uniform_mean",
        max_update_norm: float | None = None,
        max_relative_norm: float | None = None,
        min_peers: int = 2,
        min_reference_norm: float = 1e-6,
        backtrack_threshold: float | None = None,
        backtrack_monitor: str = "contributing",
        query_config: dict[str, Any] | None = None,
        body_signature: str | None = None,
        on_round: Callable[[RoundRecord, ArrayRecord], None] | None = None,
    ) -> None:
        expected = expected_nodes or len(pool)
        super().__init__(min_available_nodes=expected, min_train_nodes=contributors_per_round or 1)
        self.pool = pool
        self.contributors_per_round = contributors_per_round
        self.min_contributions = min_contributions
        self.expected_nodes = expected
        self.node_wait_timeout = node_wait_timeout
        self.timeouts = {"discovery": discovery_timeout, "train": train_timeout, "eval": eval_timeout}
        self.eval_schedule = {"probe": 1, "finetune": None, **(eval_schedule or {})}  # view -> `every` (schedule.due)
        self.finetune_roles = set(finetune_roles)
        self.few_shot = few_shot
        self.eval_start = eval_start  # False: skip round 0 (a baseline run whose start model is scored elsewhere)
        self._views: list[str] = []  # the views due in the round being evaluated
        self._asked: dict[int, tuple[str, ...]] = {}  # node -> the views it was asked for in this round
        self.on_round = on_round
        self.fuse = get_operator(fusion)
        self.max_update_norm = max_update_norm
        self.max_relative_norm = max_relative_norm
        self.min_peers = min_peers
        self.min_reference_norm = min_reference_norm
        self.reference_norms: list[float] = []  # norms fused in the last fused round (strategies.validation)
        self.backtrack_threshold = backtrack_threshold
        self.backtrack_monitor = backtrack_monitor
        self.query_config = dict(query_config or {})  # sent with the task query (e.g. the model spec)
        self.body_signature = body_signature  # nodes whose model body differs are refused at discovery
        self.rng = random.Random(seed)  # our own RNG: FedAvg samples with the module-level `random`
        self.nodes: dict[int, NodeTask] = {}
        self._base: ArrayRecord | None = None
        self._record = RoundRecord(0)

    def summary(self) -> None:
        log(INFO, "\t├──> ColD Fusion: %s contributors/round, uniform mean, min %d valid",
            self.contributors_per_round or "all", self.min_contributions)
        log(INFO, "\t└──> waiting for %d nodes (timeout %.0fs)", self.expected_nodes, self.node_wait_timeout)

    # ------------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout: float) -> dict[int, NodeTask]:
        """Wait for the expected nodes, then ask each which task it holds.

        A node that does not answer, answers with an error, or answers something malformed is a problem;
        the run fails at discovery with every problem listed.
        """
        node_ids = wait_for_nodes(grid, self.expected_nodes, self.node_wait_timeout)
        content = RecordDict({"config": ConfigRecord({"pool": json.dumps(self.pool), **self.query_config})})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        roles = {entry["name"]: entry.get("role", "contributing") for entry in self.pool}
        found, problems, answered = [], [], set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            if reply.has_error():
                problems.append(f"node {node_id}: {_first_line(reply.error.reason)}")
                continue
            try:
                answer = read_query_answer(reply)
                info = TaskInfo.from_json(answer.info_json)
            except (MalformedReply, ValueError, KeyError, TypeError) as exc:
                problems.append(f"node {node_id}: malformed answer to the task query: {_first_line(str(exc))}")
                continue
            if answer.role not in ("", "contributing", "heldout"):
                problems.append(f"node {node_id} ({info.name}): unknown role {answer.role!r}")
                continue
            if self.body_signature and answer.signature and answer.signature != self.body_signature:
                problems.append(f"node {node_id} ({info.name}): its model's body does not match the server's "
                                f"(layout digest {answer.signature} != {self.body_signature}); check model settings and caches")
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
        contributing = [n for n in nodes.values() if n.role == "contributing"]
        if not contributing:
            raise FederationError("no node holds a contributing task: nothing to train")
        if self.min_contributions > len(contributing):
            raise FederationError(f"min_contributions={self.min_contributions} is more than the {len(contributing)} "
                                  "contributing node(s): no round could ever fuse")
        self.nodes = nodes
        by_role = {r: sorted(n.label for n in nodes.values() if n.role == r) for r in ("contributing", "heldout")}
        log(INFO, "Discovered %d nodes: %d contributing, %d held out %s", len(nodes),
            len(by_role["contributing"]), len(by_role["heldout"]), by_role["heldout"])
        for node in sorted(nodes.values(), key=lambda n: n.label):
            if node.label != node.name:
                log(INFO, "  %s is node %d (site %s)", node.label, node.node_id, node.site or "unnamed")
        return nodes

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Node ids are random per run: order candidates by label (task, then site) so a seed picks the
        # same contributors in every run (and in a resumed one).
        contributing = sorted((n for n, t in self.nodes.items() if t.role == "contributing"),
                              key=lambda n: self.nodes[n].label)
        chosen = self.rng.sample(contributing, min(self.contributors_per_round or len(contributing), len(contributing)))
        self._base = arrays
        self._record = RoundRecord(server_round, contributors=[self.nodes[n].label for n in chosen])
        log(INFO, "Round %d contributors: %s", server_round, ", ".join(self._record.contributors))
        return self._messages(chosen, arrays, config, server_round, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply and contribution, then fuse the valid ones; never produce a non-finite base.

        Nothing in a reply can stop the server: a reply from an unknown node, an error, a malformed reply
        (``strategies.replies``) or a contribution failing validation is recorded with its reason.
        """
        record = self._record
        base = self._base.to_torch_state_dict()
        contributions, answered = [], set()
        for reply in replies:
            node = self.nodes.get(reply.metadata.src_node_id)
            if node is None:
                record.failures.append(f"node {reply.metadata.src_node_id}: reply from a node that was not discovered")
                continue
            answered.add(node.label)
            if reply.has_error():
                record.failures.append(f"{node.label}: error reply: {_first_line(reply.error.reason)}")
                continue
            try:
                parsed = read_train_reply(reply)
            except MalformedReply as exc:
                record.failures.append(f"{node.label}: malformed reply: {_first_line(str(exc))}")
                continue
            contributions.append(Contribution(node.node_id, node.label, parsed.round, parsed.body))
            record.train_loss[node.label] = parsed.loss
            record.train_examples[node.label] = parsed.examples
            if parsed.head_kept is False:  # first contribution, or its head was lost (e.g. a resumed simulation)
                record.heads_fresh.append(node.label)
        record.failures += [f"{label}: no reply within federation.train_timeout_s"
                            for label in record.contributors if label not in answered]
        valid, rejected, norms, notes = screen(
            contributions, base, server_round, self.max_update_norm, self.max_relative_norm,
            reference_norms=self.reference_norms, min_peers=self.min_peers,
            min_reference_norm=self.min_reference_norm)
        record.rejections = [str(r) for r in rejected]
        record.notes += notes
        record.update_norms = {label: round(norm, 6) for label, norm in sorted(norms.items())}
        for problem in record.failures + record.rejections:
            log(WARNING, "Round %d skipped a contribution: %s", server_round, problem)
        if len(valid) < self.min_contributions:
            log(WARNING, "Round %d: %d valid contribution(s) < min_contributions=%d: keeping the previous base",
                server_round, len(valid), self.min_contributions)
            return None, None
        # A fixed order (by label) makes the float64 sum, hence the fused base, reproducible bit for bit.
        valid.sort(key=lambda c: (c.label, c.node_id))
        fused = self.fuse([c.body for c in valid], base=base)
        try:
            assert_finite(fused, f"round {server_round} fused base")
        except ValueError as exc:
            log(WARNING, "%s: keeping the previous base", exc)
            record.rejections.append(str(exc))
            return None, None
        record.fused = True
        record.fused_contributors = [c.label for c in valid]
        self.reference_norms = [norms[c.label] for c in valid]
        metrics = MetricRecord({
            "contributions": len(valid),
            "failures": len(record.failures),
            "rejections": len(record.rejections),
            "train-loss": mean(record.train_loss[c.label] for c in valid),
        })
        return ArrayRecord(fused), metrics

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every node gets the probe view when due; the finetune view goes to the roles it covers."""
        messages, self._asked = [], {}
        for node_id in sorted(self.nodes, key=lambda n: self.nodes[n].label):
            node = self.nodes[node_id]
            views = tuple(v for v in self._views if v != "finetune" or node.role in self.finetune_roles)
            if views:
                self._asked[node_id] = views
                extra = {"views": ",".join(views), "role": node.role}
                messages += self._messages([node_id], arrays, ConfigRecord({**dict(config), **extra}),
                                           server_round, MessageType.EVALUATE)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Scores per task (the mean over the task's nodes that answered) and their means per role."""
        record = self._record
        by_node: dict[int, dict[str, dict[str, float]]] = {}  # node -> view -> metric -> value
        failed = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            node = self.nodes.get(node_id)
            if node is None or node_id not in self._asked:
                record.failures.append(f"node {node_id}: evaluation reply that was not asked for")
                continue
            try:
                if reply.has_error():
                    raise MalformedReply(f"error reply: {_first_line(reply.error.reason)}")
                by_node[node_id] = read_evaluate_reply(reply, self._asked[node_id])
            except MalformedReply as exc:
                failed.add(node_id)
                record.failures.append(f"{node.label}: evaluation failed: {_first_line(str(exc))}")
                log(WARNING, "Round %d: evaluation failed on %s: %s", server_round, node.label, exc)
        for node_id in sorted(set(self._asked) - set(by_node) - failed, key=lambda n: self.nodes[n].label):
            label = self.nodes[node_id].label
            record.failures.append(f"{label}: no evaluation reply within federation.eval_timeout_s")
            log(WARNING, "Round %d: no evaluation reply from %s within federation.eval_timeout_s",
                server_round, label)
        record.scores = task_scores(by_node, self.nodes)
        regression = {n.name for n in self.nodes.values() if n.info.is_regression}
        summary = {}
        for series, (view, prefix) in SERIES.items():
            per_task = {}
            for task, metrics in record.scores.get(view, {}).items():
                series_metrics = {m[len(prefix):]: v for m, v in metrics.items() if m.startswith(prefix)}
                if PRIMARY_METRICS & set(series_metrics):  # a reply may lack a series (e.g. an older client)
                    per_task[task] = primary(series_metrics)
            setattr(record, series, per_task)
            for role in ("contributing", "heldout"):
                values = [score for name, score in per_task.items()
                          if record.roles.get(name) == role and name not in regression]
                setattr(record, f"{series}_{role}", mean(values) if values else None)
                if values:
                    summary[f"{series}-{role}"] = mean(values)
        return MetricRecord(summary)

    def _messages(self, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord, server_round: int,
                  message_type: str) -> list[Message]:
        messages = []
        for node_id in node_ids:
            node_config = ConfigRecord({**dict(config), "server-round": server_round,
                                        "task-entry": self.nodes[node_id].entry})
            content = RecordDict({"arrays": arrays, "config": node_config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    # ------------------------------------------------------------------ the loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, first_round: int = 0, history: list[Mapping[str, Any]] | None = None) -> Result:
        """Discovery, round-0 evaluation of the starting model, then rounds up to ``num_rounds``.

        Flower's ``Strategy.start`` evaluates clients only after training rounds and always runs rounds
        1..N; the paper's curves start at iteration 0, and a resumed run continues at ``first_round``
        from ``initial_arrays`` with the ``history`` of round records (as dicts) written so far, from which
        the strategy takes back its decision state: the back-tracking reference, the base's round and the
        validation's reference norms, exactly as an uninterrupted run holds them. ``timeout`` is the
        per-phase default for the discovery, train and eval timeouts not given to the constructor. Every
        finished round goes to ``on_round`` at once.
        """
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        timeouts = {phase: float(t if t is not None else timeout) for phase, t in self.timeouts.items()}
        history = history or []
        last_score = monitored_score(history, self.backtrack_monitor)
        base_round = int(history[-1].get("base_round", 0)) if history else 0
        self.reference_norms = fused_norms(history)
        self.summary()
        self.discover(grid, timeouts["discovery"])
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            t0 = time.perf_counter()
            previous, previous_base_round = arrays, base_round
            self._record = RoundRecord(server_round)
            if server_round > 0:
                replies = grid.send_and_receive(self.configure_train(server_round, arrays, train_config, grid),
                                                timeout=timeouts["train"])
                fused, train_metrics = self.aggregate_train(server_round, replies)
                if fused is not None:
                    arrays, base_round = fused, server_round
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
            record = self._record
            record.seconds_train = time.perf_counter() - t0
            record.roles = {n.name: n.role for n in sorted(self.nodes.values(), key=lambda n: n.label)}
            record.few_shot = self.few_shot
            self._views = [v for v in VIEWS if due(self.eval_schedule.get(v), server_round, num_rounds)
                           and (server_round > 0 or self.eval_start or num_rounds == 0)]
            if self._views:
                t1 = time.perf_counter()
                replies = grid.send_and_receive(
                    self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeouts["eval"])
                eval_metrics = self.aggregate_evaluate(server_round, replies)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
                record.seconds_eval = time.perf_counter() - t1
            score = getattr(record, f"probe_{self.backtrack_monitor}")
            if self._should_roll_back(record, last_score, score):
                arrays, base_round = previous, previous_base_round
                record.rolled_back = True
                log(WARNING, "Round %d rolled back: %s probe fell from %.4f to %.4f (contributors: %s)",
                    server_round, self.backtrack_monitor, last_score, score, ", ".join(record.contributors))
            elif score is not None:
                last_score = score
            record.base_round = base_round
            log(INFO, "Round %d/%d done in %.1fs: probe seen=%s unseen=%s, finetune seen=%s unseen=%s",
                server_round, num_rounds, record.seconds_train + record.seconds_eval,
                *(_fmt(getattr(record, f"{v}_{r}")) for v in VIEWS for r in ("contributing", "heldout")))
            if self.on_round is not None:
                self.on_round(record, arrays)
        result.arrays = arrays
        return result

    def _should_roll_back(self, record: RoundRecord, before: float | None, after: float | None) -> bool:
        return (self.backtrack_threshold is not None and record.fused and before is not None
                and after is not None and before - after > self.backtrack_threshold)


def task_scores(by_node: Mapping[int, Mapping[str, Mapping[str, float]]],
                nodes: Mapping[int, NodeTask]) -> dict[str, dict[str, dict[str, float]]]:
    """view -> task -> metric -> value: each metric averaged over the task's nodes that reported it."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for node_id, views in by_node.items():
        for view, metrics in views.items():
            per_task = collected.setdefault(view, {}).setdefault(nodes[node_id].name, {})
            for metric, value in metrics.items():
                per_task.setdefault(metric, []).append(value)
    return {view: {task: {m: mean(v) for m, v in metrics.items()} for task, metrics in sorted(tasks.items())}
            for view, tasks in collected.items()}


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


def _first_line(text: str, limit: int = 200) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
