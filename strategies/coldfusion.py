"""The ColD Fusion strategy: sample contributors, fuse their bodies uniformly, redistribute.

Each round: K contributors (sampled with a seeded RNG among the nodes holding contributing tasks)
receive the current body, finetune body + their own head, and send back the body; the strategy fuses
the valid bodies with a uniform mean (``strategies.fusion.uniform_mean``) into the next base. Then
the nodes score the new base on their tasks in the evaluation views that are due this round (linear
probe and full finetuning, each on its own schedule; ``app.evaluation``): contributing ("seen") and
held-out ("unseen") tasks alike.

Node ids are random, so the strategy first asks every node which task it holds (a ``query`` message).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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

from app.metrics import primary
from strategies.fusion import get_operator
from strategies.schedule import VIEWS, due
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


@dataclass
class RoundRecord:
    """Everything that happened in one round; one line of ``metrics.jsonl``."""

    round: int
    contributors: list[str] = field(default_factory=list)
    train_loss: dict[str, float] = field(default_factory=dict)
    train_examples: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "task: reason": error replies and missing replies
    rejections: list[str] = field(default_factory=list)  # "task (node n): reason": contributions failing validation
    update_norms: dict[str, float] = field(default_factory=dict)  # L2 norm of each well-formed update
    fused: bool = False
    rolled_back: bool = False  # back-tracking undid this round's fusion
    roles: dict[str, str] = field(default_factory=dict)  # task -> contributing ("seen") | heldout ("unseen")
    # Per view: each task's primary score (accuracy, Pearson r for regression) and the means over the
    # classification tasks of each role (regression is left out of the means, as in the paper).
    probe: dict[str, float] = field(default_factory=dict)
    probe_contributing: float | None = None
    probe_heldout: float | None = None
    finetune: dict[str, float] = field(default_factory=dict)
    finetune_contributing: float | None = None
    finetune_heldout: float | None = None
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # view -> task -> every metric
    few_shot: int | None = None  # held-out tasks trained on this many examples in the views
    seconds_train: float = 0.0
    seconds_eval: float = 0.0


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
        eval_schedule: dict[str, int | str | None] | None = None,
        finetune_roles: Iterable[str] = ("contributing", "heldout"),
        few_shot: int | None = None,
        eval_start: bool = True,
        fusion: str = "uniform_mean",
        max_update_norm: float | None = None,
        max_relative_norm: float | None = None,
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
        self.eval_schedule = {"probe": 1, "finetune": None, **(eval_schedule or {})}  # view -> `every` (app.evaluation.due)
        self.finetune_roles = set(finetune_roles)
        self.few_shot = few_shot
        self.eval_start = eval_start  # False: skip round 0 (a baseline run whose start model is scored elsewhere)
        self._views: list[str] = []  # the views due in the round being evaluated
        self._asked: set[str] = set()  # the tasks asked to evaluate in this round
        self.on_round = on_round
        self.fuse = get_operator(fusion)
        self.max_update_norm = max_update_norm
        self.max_relative_norm = max_relative_norm
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
        """Wait for the expected nodes, then ask each which task it holds."""
        node_ids = wait_for_nodes(grid, self.expected_nodes, self.node_wait_timeout)
        content = RecordDict({"config": ConfigRecord({"pool": json.dumps(self.pool), **self.query_config})})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        roles = {entry["name"]: entry.get("role", "contributing") for entry in self.pool}
        nodes, problems = {}, []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                problems.append(f"node {node_id}: {reply.error.reason}")
                continue
            answer = reply.content["task"]
            info = TaskInfo.from_json(str(answer["info"]))
            signature = answer.get("body-signature")
            if self.body_signature and signature and signature != self.body_signature:
                problems.append(f"node {node_id} ({info.name}): its model's body does not match the server's "
                                f"(layout digest {signature} != {self.body_signature}); check model settings and caches")
            role = str(answer["role"]) or roles.get(info.name, "contributing")
            nodes[node_id] = NodeTask(node_id, info.name, role, info, str(answer["entry"]))
        if len(replies) < len(node_ids):
            problems.append(f"{len(node_ids) - len(replies)} node(s) did not answer the task query in {timeout:.0f}s")
        if problems:
            raise FederationError("task discovery failed: " + "; ".join(problems))
        check_consistent_tasks(nodes.values())
        if not any(n.role == "contributing" for n in nodes.values()):
            raise FederationError("no node holds a contributing task: nothing to train")
        self.nodes = nodes
        by_role = {r: sorted(n.name for n in nodes.values() if n.role == r) for r in ("contributing", "heldout")}
        log(INFO, "Discovered %d nodes: %d contributing tasks, %d held out %s", len(nodes),
            len(by_role["contributing"]), len(by_role["heldout"]), by_role["heldout"])
        return nodes

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Node ids are random per run: order candidates by task name so a seed picks the same tasks
        # in every run (and in a resumed one).
        contributing = sorted((n for n, t in self.nodes.items() if t.role == "contributing"),
                              key=lambda n: (self.nodes[n].name, n))
        chosen = self.rng.sample(contributing, min(self.contributors_per_round or len(contributing), len(contributing)))
        self._base = arrays
        self._record = RoundRecord(server_round, contributors=[self.nodes[n].name for n in chosen])
        log(INFO, "Round %d contributors: %s", server_round, ", ".join(self._record.contributors))
        return self._messages(chosen, arrays, config, server_round, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every contribution, then fuse the valid ones; never produce a non-finite base."""
        record = self._record
        replies = list(replies)
        base = self._base.to_torch_state_dict()
        contributions = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            task = self.nodes[node_id].name
            if reply.has_error():
                record.failures.append(f"{task}: error reply: {_first_line(reply.error.reason)}")
                continue
            metrics = reply.content["metrics"]
            contributions.append(Contribution(node_id, task, int(metrics.get("server-round", -1)),
                                              reply.content["arrays"].to_torch_state_dict()))
            record.train_loss[task] = float(metrics["train-loss"])
            record.train_examples[task] = int(metrics["num-examples"])
        answered = {self.nodes[r.metadata.src_node_id].name for r in replies}
        record.failures += [f"{name}: no reply within the round timeout"
                            for name in record.contributors if name not in answered]
        valid, rejected, norms = screen(contributions, base, server_round, self.max_update_norm,
                                        self.max_relative_norm)
        record.rejections = [str(r) for r in rejected]
        record.update_norms = {task: round(norm, 6) for task, norm in sorted(norms.items())}
        for problem in record.failures + record.rejections:
            log(WARNING, "Round %d skipped a contribution: %s", server_round, problem)
        if len(valid) < self.min_contributions:
            log(WARNING, "Round %d: %d valid contribution(s) < min_contributions=%d: keeping the previous base",
                server_round, len(valid), self.min_contributions)
            return None, None
        # A fixed order (by task) makes the float64 sum, hence the fused base, reproducible bit for bit.
        valid.sort(key=lambda c: (c.task, c.node_id))
        fused = self.fuse([c.body for c in valid], base=base)
        try:
            assert_finite(fused, f"round {server_round} fused base")
        except ValueError as exc:
            log(WARNING, "%s: keeping the previous base", exc)
            record.rejections.append(str(exc))
            return None, None
        record.fused = True
        metrics = MetricRecord({
            "contributions": len(valid),
            "failures": len(record.failures),
            "rejections": len(record.rejections),
            "train-loss": mean(record.train_loss[c.task] for c in valid),
        })
        return ArrayRecord(fused), metrics

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every node gets the probe view when due; the finetune view goes to the roles it covers."""
        messages, self._asked = [], set()
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            views = [v for v in self._views if v != "finetune" or node.role in self.finetune_roles]
            if views:
                self._asked.add(node.name)
                extra = {"views": ",".join(views), "role": node.role}
                messages += self._messages([node_id], arrays, ConfigRecord({**dict(config), **extra}),
                                           server_round, MessageType.EVALUATE)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record = self._record
        replies = list(replies)
        by_view: dict[str, dict[str, dict[str, float]]] = {}  # view -> task -> metric -> value
        for reply in replies:
            node = self.nodes[reply.metadata.src_node_id]
            if reply.has_error():
                log(WARNING, "Round %d: evaluation failed on %s: %s", server_round, node.name,
                    _first_line(reply.error.reason))
                continue
            for key, value in reply.content["metrics"].items():
                view, _, metric = key.partition(".")
                if view in VIEWS:
                    by_view.setdefault(view, {}).setdefault(node.name, {})[metric] = float(value)
        answered = {self.nodes[r.metadata.src_node_id].name for r in replies}
        for name in sorted(self._asked - answered):  # a late reply is dropped by the round timeout: say so
            record.failures.append(f"{name}: no evaluation reply within the round timeout")
            log(WARNING, "Round %d: no evaluation reply from %s within the round timeout "
                "(federation.round_timeout_s)", server_round, name)
        regression = {n.name for n in self.nodes.values() if n.info.is_regression}
        summary = {}
        for view, tasks in by_view.items():
            record.scores[view] = dict(sorted(tasks.items()))
            per_task = {name: primary(metrics) for name, metrics in record.scores[view].items()}
            setattr(record, view, per_task)
            for role in ("contributing", "heldout"):
                values = [score for name, score in per_task.items()
                          if record.roles[name] == role and name not in regression]
                setattr(record, f"{view}_{role}", mean(values) if values else None)
                if values:
                    summary[f"{view}-{role}"] = mean(values)
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
              evaluate_fn=None, first_round: int = 0, last_score: float | None = None) -> Result:
        """Discovery, round-0 evaluation of the starting model, then rounds up to ``num_rounds``.

        Flower's ``Strategy.start`` evaluates clients only after training rounds and always runs rounds
        1..N; the paper's curves start at iteration 0, and a resumed run continues at ``first_round``
        (with ``last_score``, the monitored score of its base, for back-tracking). Every finished round
        goes to ``on_round`` at once.
        """
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.summary()
        self.discover(grid, timeout)
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            t0 = time.perf_counter()
            previous = arrays
            self._record = RoundRecord(server_round)
            if server_round > 0:
                replies = grid.send_and_receive(self.configure_train(server_round, arrays, train_config, grid),
                                                timeout=timeout)
                fused, train_metrics = self.aggregate_train(server_round, replies)
                if fused is not None:
                    arrays = fused
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
            record = self._record
            record.seconds_train = time.perf_counter() - t0
            record.roles = {n.name: n.role for n in sorted(self.nodes.values(), key=lambda n: n.name)}
            record.few_shot = self.few_shot
            self._views = [v for v in VIEWS if due(self.eval_schedule.get(v), server_round, num_rounds)
                           and (server_round > 0 or self.eval_start or num_rounds == 0)]
            if self._views:
                t1 = time.perf_counter()
                replies = grid.send_and_receive(
                    self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout)
                eval_metrics = self.aggregate_evaluate(server_round, replies)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
                record.seconds_eval = time.perf_counter() - t1
                score = getattr(record, f"probe_{self.backtrack_monitor}")
                if self._should_roll_back(record, last_score, score):
                    arrays = previous
                    record.rolled_back = True
                    log(WARNING, "Round %d rolled back: %s probe fell from %.4f to %.4f (contributors: %s)",
                        server_round, self.backtrack_monitor, last_score, score, ", ".join(record.contributors))
                elif score is not None:
                    last_score = score
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
