"""The ColD Fusion strategy: sample contributors, fuse their bodies, redistribute.

Each round: K contributors (sampled with a seeded RNG among the nodes holding contributing tasks)
receive the current body, finetune body + their own head, and send back the body; the strategy validates
each reply as it arrives and folds the valid bodies into the next base with its fusion operator
(``strategies.exchange``, ``strategies.intake``, ``strategies.fusion``; the paper's uniform mean by default).
Then the nodes score the new base on their tasks in the evaluation views that are due this round (linear
probe and full finetuning, each on its own schedule; ``app.learning.views``): contributing ("seen") and
held-out ("unseen") tasks alike.

Node ids are random, so the strategy first asks every node which task it holds (``strategies.discovery``).
What a round did is one :class:`strategies.records.RoundRecord`, handed to ``on_round`` as soon as it ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from statistics import mean
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from strategies.backtrack import Backtracking
from strategies.discovery import FederationError, NodeTask, discover_nodes
from strategies.exchange import exchange
from strategies.fusion import FusionOperator, build_operator
from strategies.intake import RoundIntake
from strategies.records import RoundRecord, fused_norms, task_scores
from strategies.replies import MalformedReply, array_bytes, first_line, read_evaluate_reply, read_train_reply
from strategies.schedule import VIEWS, due
from strategies.transport import TransportError, encode, received_body, sends_updates, to_state_dict
from strategies.validation import Contribution, NormRule, assert_finite


class ColdFusion(FedAvg):
    """Fusion of contributor bodies (the paper's uniform mean by default), with task discovery and per-task
    evaluation."""

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
        fusion: FusionOperator | Mapping[str, Any] | str = "uniform_mean",  # an operator, or its config
        max_update_norm: float | None = None,
        max_relative_norm: float | None = None,
        min_peers: int = 2,
        min_reference_norm: float = 1e-6,
        backtrack_threshold: float | None = None,
        backtrack_monitor: str = "contributing",
        query_config: dict[str, Any] | None = None,
        pinned: Iterable[str] = (),  # testing aid: tasks in every round's sample (attack benchmarks)
        transport: str = "float32",  # the precision bodies travel in (strategies.transport)
        progress_s: float = 30.0,  # a progress line per phase every this many seconds
        poll_s: float = 1.0,  # how often to ask Flower for replies that have arrived
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
        self.fusion = fusion if isinstance(fusion, FusionOperator) else build_operator(fusion)
        self._fusion_state_before: dict = {}  # the operator's state before this round's fusion (for a roll-back)
        self.max_update_norm = max_update_norm
        self.max_relative_norm = max_relative_norm
        self.min_peers = min_peers
        self.min_reference_norm = min_reference_norm
        self.reference_norms: list[float] = []  # norms fused in the last fused round that stood (strategies.validation)
        self.backtrack_threshold = backtrack_threshold
        self.backtracking = Backtracking(backtrack_threshold, backtrack_monitor)  # refuses a held-out monitor
        self.query_config = dict(query_config or {})  # sent with the task query (e.g. the model spec)
        self.body_signature = body_signature  # nodes whose model body differs are refused at discovery
        self.rng = random.Random(seed)  # our own RNG: FedAvg samples with the module-level `random`
        self.pinned = set(pinned)
        self.progress_s, self.poll_s = progress_s, poll_s
        self.transport = transport
        sends_updates(transport)  # an unknown transport fails here, not in round 1
        self._chosen: list[int] = []  # this round's contributors (node ids)
        self._answered: set[str] = set()  # labels of this round's contributors that replied
        self.nodes: dict[int, NodeTask] = {}
        self._base: ArrayRecord | None = None
        self._record = RoundRecord(0)

    def summary(self) -> None:
        log(INFO, "\t├──> ColD Fusion: %s contributors/round, fusion %s, min %d valid",
            self.contributors_per_round or "all", self.fusion.describe(), self.min_contributions)
        log(INFO, "\t└──> waiting for %d nodes (timeout %.0fs)", self.expected_nodes, self.node_wait_timeout)

    # ------------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout: float) -> dict[int, NodeTask]:
        """Wait for the expected nodes and ask each which task it holds (``strategies.discovery``); then check
        that this federation can train at all."""
        nodes = discover_nodes(grid, self.pool, self.expected_nodes, self.node_wait_timeout, timeout,
                               self.query_config, self.body_signature)
        contributing = [n for n in nodes.values() if n.role == "contributing"]
        if not contributing:
            raise FederationError("no node holds a contributing task: nothing to train")
        if self.min_contributions > len(contributing):
            raise FederationError(f"min_contributions={self.min_contributions} is more than the {len(contributing)} "
                                  "contributing node(s): no round could ever fuse")
        unknown = self.pinned - {n.name for n in contributing}
        if unknown:
            raise FederationError(f"faults.pinned {sorted(unknown)} are not contributing tasks of this federation")
        self.nodes = nodes
        return nodes

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Node ids are random per run: order candidates by label (task, then site) so a seed picks the
        # same contributors in every run (and in a resumed one).
        contributing = sorted((n for n, t in self.nodes.items() if t.role == "contributing"),
                              key=lambda n: self.nodes[n].label)
        k = min(self.contributors_per_round or len(contributing), len(contributing))
        pinned = [n for n in contributing if self.nodes[n].name in self.pinned][:k]
        # Without pinned tasks this is rng.sample(contributing, k), as it always was: the same draws.
        chosen = pinned + self.rng.sample([n for n in contributing if n not in pinned], k - len(pinned))
        self._base, self._chosen, self._answered = arrays, chosen, set()
        self._record = RoundRecord(server_round, contributors=[self.nodes[n].label for n in chosen])
        log(INFO, "Round %d contributors: %s", server_round, ", ".join(self._record.contributors))
        in_turn = sorted(chosen, key=lambda n: (self.nodes[n].label, n))  # the fold's order: fewer wait on disk
        messages = self._messages(in_turn, self._wire(arrays), config, server_round, MessageType.TRAIN)
        self._record.bytes_train_sent = sum(array_bytes(m.content) for m in messages)
        return messages

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training round, streamed: each reply is validated and folded into the fusion as it arrives
        (``strategies.exchange``, ``strategies.intake``), so the server never holds the round's bodies at once."""
        messages = self.configure_train(server_round, arrays, config, grid)
        intake = self._open_intake(server_round)
        record = self._record

        def progress(pending: int, elapsed: float) -> str:
            return (f"Round {server_round} training: {len(self._answered)}/{len(record.contributors)} replied "
                    f"({len(record.failures) + intake.rejected()} failed or rejected, "
                    f"{intake.waiting()} waiting on disk), {pending} pending, {elapsed:.0f}s")

        exchange(grid, messages, timeout, lambda reply: self._take_train_reply(reply, intake, consume=True), progress,
                 progress_s=self.progress_s, poll_s=self.poll_s)
        return self._close_round(server_round, intake)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's batch form of ``train_round``: the replies of the round sent by ``configure_train``, all at
        once; the same checks and the same fused base."""
        intake = self._open_intake(server_round)
        for reply in replies:
            self._take_train_reply(reply, intake)
        return self._close_round(server_round, intake)

    def _open_intake(self, server_round: int) -> RoundIntake:
        base = to_state_dict(self._base)
        rule = NormRule(self.max_update_norm, self.max_relative_norm, tuple(self.reference_norms), self.min_peers,
                        self.min_reference_norm)
        expected = [(self.nodes[n].label, n) for n in self._chosen]
        return RoundIntake(self.fusion.start(base, server_round), base, server_round, expected, rule)

    def _take_train_reply(self, reply: Message, intake: RoundIntake, consume: bool = False) -> None:
        """Nothing in a reply can stop the server: a reply from an unknown node, an error, a malformed reply
        (``strategies.replies``) or a contribution failing validation is recorded with its reason. ``consume``: a
        reply pulled for this call alone, emptied as it is read."""
        record = self._record
        node = self.nodes.get(reply.metadata.src_node_id)
        if node is None:
            record.failures.append(f"node {reply.metadata.src_node_id}: reply from a node that was not discovered")
            return
        self._answered.add(node.label)
        if reply.has_content():
            record.bytes_train_received += array_bytes(reply.content)
        if reply.has_error():
            record.failures.append(f"{node.label}: error reply: {first_line(reply.error.reason)}")
            intake.missing(node.label)
            return
        try:
            parsed = read_train_reply(reply, consume=consume)
            body = received_body(parsed.body, intake.base, self.transport)
        except (MalformedReply, TransportError) as exc:
            record.failures.append(f"{node.label}: malformed reply: {first_line(str(exc))}")
            intake.missing(node.label)
            return
        record.train_loss[node.label] = parsed.loss
        record.train_examples[node.label] = parsed.examples
        if parsed.head_kept is False:  # first contribution, or its head was lost (e.g. a resumed simulation)
            record.heads_fresh.append(node.label)
        intake.take(Contribution(node.node_id, node.label, parsed.round, body, parsed.examples))

    def _close_round(self, server_round: int, intake: RoundIntake) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Every verdict is in: record them and, with enough valid contributions, finish the fusion; never produce
        a non-finite base."""
        record = self._record
        taken = intake.close()
        record.heads_fresh.sort()  # replies arrive in any order; the record does not depend on it
        record.failures += [f"{label}: no reply within federation.train_timeout_s"
                            for label in record.contributors if label not in self._answered]
        record.rejections = [str(r) for r in taken.rejections]
        record.notes += taken.notes
        record.update_norms = {label: round(norm, 6) for label, norm in taken.norms.items()}
        for problem in record.failures + record.rejections:
            log(WARNING, "Round %d skipped a contribution: %s", server_round, problem)
        if taken.spilled:
            log(INFO, "Round %d: %d contribution(s) arrived ahead of their turn and waited on disk (at most %d at once)",
                server_round, taken.spilled, taken.peak_waiting)
        if len(taken.folded) < self.min_contributions:
            log(WARNING, "Round %d: %d valid contribution(s) < min_contributions=%d: keeping the previous base",
                server_round, len(taken.folded), self.min_contributions)
            return None, None
        # A snapshot without copying: an operator's step builds new state tensors, never writes into old ones.
        self._fusion_state_before = dict(self.fusion.state_dict())
        fused = intake.accumulator.finish()
        try:
            assert_finite(fused, f"round {server_round} fused base")
        except ValueError as exc:
            log(WARNING, "%s: keeping the previous base", exc)
            record.rejections.append(str(exc))
            self.fusion.load_state_dict(self._fusion_state_before)  # the base stays, so does the optimizer
            return None, None
        record.fused = True
        record.fusion = self.fusion.describe()
        record.fused_contributors = list(taken.folded)
        self.reference_norms = [taken.norms[label] for label in taken.folded]
        metrics = MetricRecord({
            "contributions": len(taken.folded),
            "failures": len(record.failures),
            "rejections": len(record.rejections),
            "train-loss": mean(record.train_loss[label] for label in taken.folded),
        })
        return ArrayRecord(fused), metrics

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every node gets the probe view when due; the finetune view goes to the roles it covers."""
        messages, self._asked, wire = [], {}, self._wire(arrays)
        for node_id in sorted(self.nodes, key=lambda n: self.nodes[n].label):
            node = self.nodes[node_id]
            views = tuple(v for v in self._views if v != "finetune" or node.role in self.finetune_roles)
            if views:
                self._asked[node_id] = views
                extra = {"views": ",".join(views), "role": node.role}
                messages += self._messages([node_id], wire, ConfigRecord({**dict(config), **extra}),
                                           server_round, MessageType.EVALUATE)
        self._record.bytes_eval_sent = sum(array_bytes(m.content) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Scores per task (the mean over the task's nodes that answered) and their means per role."""
        record = self._record
        by_node: dict[int, dict[str, dict[str, float]]] = {}  # node -> view -> metric -> value
        failed = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            node = self.nodes.get(node_id)
            if reply.has_content():
                record.bytes_eval_received += array_bytes(reply.content)
            if node is None or node_id not in self._asked:
                record.failures.append(f"node {node_id}: evaluation reply that was not asked for")
                continue
            try:
                if reply.has_error():
                    raise MalformedReply(f"error reply: {first_line(reply.error.reason)}")
                by_node[node_id] = read_evaluate_reply(reply, self._asked[node_id])
            except MalformedReply as exc:
                failed.add(node_id)
                record.failures.append(f"{node.label}: evaluation failed: {first_line(str(exc))}")
                log(WARNING, "Round %d: evaluation failed on %s: %s", server_round, node.label, exc)
        for node_id in sorted(set(self._asked) - set(by_node) - failed, key=lambda n: self.nodes[n].label):
            label = self.nodes[node_id].label
            record.failures.append(f"{label}: no evaluation reply within federation.eval_timeout_s")
            log(WARNING, "Round %d: no evaluation reply from %s within federation.eval_timeout_s",
                server_round, label)
        record.scores = task_scores(by_node, {n: t.name for n, t in self.nodes.items()})
        return MetricRecord(record.summarise_scores({n.name for n in self.nodes.values() if n.info.is_regression}))

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The base as it travels (``strategies.transport``), encoded once for every message of a phase."""
        return ArrayRecord(encode(to_state_dict(arrays), self.transport)) if sends_updates(self.transport) \
            else arrays

    def _messages(self, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord, server_round: int,
                  message_type: str) -> list[Message]:
        messages = []
        for node_id in node_ids:
            node_config = ConfigRecord({**dict(config), "server-round": server_round,
                                        "task-entry": self.nodes[node_id].entry, "transport": self.transport})
            content = RecordDict({"arrays": arrays, "config": node_config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    # ------------------------------------------------------------------ the loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, first_round: int = 0, history: Sequence[RoundRecord] = ()) -> Result:
        """Discovery, round-0 evaluation of the starting model, then rounds up to ``num_rounds``.

        Flower's ``Strategy.start`` evaluates clients only after training rounds and always runs rounds
        1..N; the paper's curves start at iteration 0, and a resumed run continues at ``first_round``
        from ``initial_arrays`` with the ``history`` of round records written so far, from which
        the strategy takes back its decision state (back-tracking reference, base round, reference norms) exactly
        as an uninterrupted run holds it. ``timeout``: the default of every phase's timeout not given to the
        constructor. Every finished round goes to ``on_round`` at once."""
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        timeouts = {phase: float(t if t is not None else timeout) for phase, t in self.timeouts.items()}
        self.backtracking.resume(history)
        base_round = history[-1].base_round if history else 0
        self.reference_norms = fused_norms(history)
        self.summary()
        self.discover(grid, timeouts["discovery"])
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            t0 = time.perf_counter()
            previous, previous_base_round, previous_norms = arrays, base_round, self.reference_norms
            self._record = RoundRecord(server_round)
            if server_round > 0:
                fused, train_metrics = self.train_round(grid, server_round, arrays, train_config, timeouts["train"])
                if fused is not None:
                    arrays, base_round = fused, server_round
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
            record = self._record
            record.seconds_train = time.perf_counter() - t0
            self.evaluate_round(grid, server_round, arrays, evaluate_config, timeouts["eval"], num_rounds, result)
            drop = self.backtracking.judge(record)
            if drop is not None:
                arrays, base_round = previous, previous_base_round
                self.fusion.load_state_dict(self._fusion_state_before)  # a server optimizer's step is undone too
                self.reference_norms = previous_norms  # only fused rounds that stood give reference norms
                record.rolled_back = True
                log(WARNING, "Round %d rolled back: %s dev probe fell from %.4f to %.4f (contributors: %s)",
                    server_round, self.backtracking.monitor, *drop, ", ".join(record.contributors))
            record.base_round = base_round
            log(INFO, "Round %d/%d done in %.1fs: probe seen=%s unseen=%s, finetune seen=%s unseen=%s",
                server_round, num_rounds, record.seconds_train + record.seconds_eval,
                *(_fmt(getattr(record, f"{v}_{r}")) for v in VIEWS for r in ("contributing", "heldout")))
            if self.on_round is not None:
                self.on_round(record, arrays)
        result.arrays = arrays
        return result

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, evaluate_config: ConfigRecord,
                       timeout: float, num_rounds: int, result: Result) -> None:
        """Score ``arrays`` in the views due in ``server_round`` (``strategies.schedule``) on every node they go to,
        into the round's record (with the roles it is read by) and ``result``."""
        record = self._record
        record.roles = {n.name: n.role for n in sorted(self.nodes.values(), key=lambda n: n.label)}
        record.regression = sorted({n.name for n in self.nodes.values() if n.info.is_regression})
        record.few_shot = self.few_shot
        self._views = [v for v in VIEWS if due(self.eval_schedule.get(v), server_round, num_rounds)
                       and (server_round > 0 or self.eval_start or num_rounds == 0)]
        if not self._views:
            return
        t0 = time.perf_counter()
        replies: list[Message] = []
        exchange(grid, self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout, replies.append,
                 lambda pending, elapsed: (f"Round {server_round} evaluation: {len(replies)}/{len(self._asked)} "
                                           f"replied, {pending} pending, {elapsed:.0f}s"),
                 progress_s=self.progress_s, poll_s=self.poll_s)
        eval_metrics = self.aggregate_evaluate(server_round, replies)
        if eval_metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = eval_metrics
        record.seconds_eval = time.perf_counter() - t0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
