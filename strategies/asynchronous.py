"""Asynchronous ColD Fusion (``mode=async``): contributors train at their own pace, in the FedBuff style (Nguyen et
al. 2022, https://arxiv.org/abs/2106.06639); the paper leaves asynchronous contribution as future work.

The synchronous loop waits for a round's slowest contributor. Here the server keeps ``concurrency`` contributors
training at all times, on Flower's Message API (each job pushed on its own, each reply pulled as it arrives):

* a **job** is one contributor finetuning the newest base **version** it was sent; every job has a number, unique
  in the run (the order it was sent in), which the node also uses as its ``server-round`` (its data and seed);
* a contributor replies with its **update** against the base version it received (whatever ``transport.dtype``);
  the server adds it to the *current* base, so the contribution stands for ``current + update``, and validates
  it as the synchronous loop does (keys, shapes, dtypes, finiteness, the update-norm rules);
* its **staleness** is the number of versions fused since the one it trained on. Older than
  ``max_staleness``: rejected with its reason. Otherwise it is folded into the fusion operator's accumulator at
  once, its staleness discounted by ``s = 1/sqrt(1 + staleness)`` (``staleness_weight=inverse_sqrt``;
  ``constant``: 1), Nguyen et al.'s rule of thumb, in one of two ways (``aggregation``, ``server_lr`` = η):
  ``normalised`` folds ``base + η·update`` with the weight ``s``, so the operator divides by the sum of the
  weights and a buffer of equally stale updates moves the base as far as a fresh one; ``fedbuff`` (FedBuff's
  rule) folds ``base + η·s·update`` with weight 1, so a uniform mean gives ``base + η/|buffer| · Σ s·update``
  and staleness shrinks the step. The update-norm rules judge the update as received, before either factor;
* after ``buffer_size`` folded contributions the accumulator finishes: the next version. It is checkpointed
  (``on_round``) and, when due (``eval.<view>.every``, in versions), scored in both views as a round is; then
  idle contributors are sent work with it. A node contributes at most once to a version.

The norm rule cannot wait for "the round's other replies" (there is no round): a contribution is judged when
it arrives, its peers being the norms fused in the last version and those already folded into this one.

**What is and is not repeatable.** Which replies land in which version depends on arrival times, so an async
run is not repeatable bit for bit, and the fold follows arrival order. A run killed and resumed restarts from
its last checkpointed version with an empty buffer: the work in flight at the crash and the contributions
folded into the unfinished version are lost and the work is sent again, never counted twice (each fused job is
in exactly one version's record, ``jobs``). Back-tracking is a synchronous-round rule and is refused here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from strategies.coldfusion import ColdFusion
from strategies.discovery import FederationError
from strategies.records import RoundRecord, fused_norms
from strategies.replies import MalformedReply, array_bytes, first_line, read_train_reply
from strategies.transport import TransportError, decode, to_state_dict
from strategies.validation import NormRule, Rejection, assert_finite, inspect

STALENESS_WEIGHTS = ("inverse_sqrt", "constant")
AGGREGATIONS = ("normalised", "fedbuff")


def staleness_weight(rule: str, staleness: int) -> float:
    """A contribution's weight in the fold: ``1/sqrt(1 + staleness)`` (inverse_sqrt) or 1 (constant)."""
    if rule == "inverse_sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if rule == "constant":
        return 1.0
    raise ValueError(f"unknown asynchronous.staleness_weight {rule!r}: one of {', '.join(STALENESS_WEIGHTS)}")


def fold_terms(aggregation: str, staleness_rule: str, staleness: int, server_lr: float = 1.0) -> tuple[float, float]:
    """(the contribution's weight in the fold, the factor on its update): ``normalised`` weighs by the staleness
    weight (the operator then divides by the weights' sum), ``fedbuff`` scales the update by it (module docstring)."""
    s = staleness_weight(staleness_rule, staleness)
    if aggregation == "normalised":
        return s, server_lr
    if aggregation == "fedbuff":
        return 1.0, server_lr * s
    raise ValueError(f"unknown asynchronous.aggregation {aggregation!r}: one of {', '.join(AGGREGATIONS)}")


def refusal(operator, aggregation: str, staleness_rule: str) -> str | None:
    """Why the fusion operator cannot take this fold (None if it can): the median and the trimmed mean count every
    contribution once, so they cannot take the staleness as a weight (``normalised``; ``constant`` weighs 1)."""
    if getattr(operator, "weighs", True) or aggregation != "normalised" or staleness_rule == "constant":
        return None
    return (f"mode=async with fusion={operator.name}: asynchronous.aggregation=normalised weighs each contribution "
            f"by its staleness (asynchronous.staleness_weight={staleness_rule}), but {operator.name} counts every "
            "contribution once; set asynchronous.aggregation=fedbuff (the staleness scales the update instead) or "
            "asynchronous.staleness_weight=constant")


def rebased(update: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The body an update stands for on ``base``: ``base + update`` for every floating tensor that matches the base
    (in the base's dtype); anything else as it came, for validation to name."""
    out = {}
    for key, value in update.items():
        ref = base.get(key)
        fits = ref is not None and ref.is_floating_point() and value.shape == ref.shape and value.dtype == ref.dtype
        out[key] = ref + value if fits else value
    return out


@dataclass
class Job:
    number: int
    node_id: int
    label: str
    version: int  # the base version it was sent
    sent_at: float


class AsyncColdFusion(ColdFusion):
    """ColD Fusion with asynchronous contributions (module docstring); ``num_rounds`` counts base versions."""

    def __init__(self, *, concurrency: int = 8, buffer_size: int = 4, max_staleness: int | None = 8,
                 staleness_rule: str = "inverse_sqrt", aggregation: str = "normalised", server_lr: float = 1.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if self.backtrack_threshold is not None:
            raise ValueError("back-tracking (backtrack.threshold) rolls back synchronous rounds; mode=async refuses "
                             "it: set backtrack.threshold=null")
        fold_terms(aggregation, staleness_rule, 0)  # an unknown rule fails here, not at the first reply
        if not server_lr > 0:
            raise ValueError(f"asynchronous.server_lr has invalid value {server_lr!r}: must be > 0")
        if problem := refusal(self.fusion, aggregation, staleness_rule):  # here, not at the first stale reply
            raise ValueError(problem)
        self.concurrency, self.buffer_size = concurrency, buffer_size
        self.max_staleness, self.staleness_rule = max_staleness, staleness_rule
        self.aggregation, self.server_lr = aggregation, float(server_lr)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> asynchronous: %d training at once, a version every %d contributions, max staleness %s (%s, "
            "%s, server_lr %g)", self.concurrency, self.buffer_size, self.max_staleness, self.staleness_rule,
            self.aggregation, self.server_lr)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, first_round: int = 0, history: Sequence[RoundRecord] = ()) -> Result:
        """Discovery, version 0's evaluation (a new run), then versions up to ``num_rounds``; a resumed run
        continues after its last version (``history``), with nothing in flight."""
        self._train_config, self._eval_config = train_config or ConfigRecord(), evaluate_config or ConfigRecord()
        self._timeouts = {phase: float(t if t is not None else timeout) for phase, t in self.timeouts.items()}
        self._num_versions, self._result = num_rounds, Result(arrays=initial_arrays)
        self.reference_norms = fused_norms(history)
        self._dispatched = history[-1].dispatched if history else 0
        self.summary()
        self.discover(grid, self._timeouts["discovery"])
        contributing = [n for n, t in self.nodes.items() if t.role == "contributing"]
        if self.buffer_size > len(contributing):
            raise FederationError(f"asynchronous.buffer_size={self.buffer_size} is more than the {len(contributing)} "
                                  "contributing node(s): a node contributes once per version, so no version could fuse")
        self._version = max(first_round - 1, 0)
        self._set_base(initial_arrays)
        if first_round == 0:  # version 0: the start model, scored as round 0 is
            self._record = RoundRecord(0, mode="async")
            self.evaluate_round(grid, 0, initial_arrays, self._eval_config, self._timeouts["eval"], num_rounds,
                                self._result)
            self._emit(initial_arrays)
        self._open_version()
        self._in_flight: dict[str, Job] = {}
        self._unusable = 0  # replies in a row that could not be folded
        last_line = time.monotonic()
        while self._version < num_rounds:
            self._dispatch(grid)
            if not self._in_flight:
                raise FederationError(f"version {self._version + 1}: no contributor can be sent work (every "
                                      "contributing node is busy, gone or has contributed to this version)")
            now = time.monotonic()
            if now - last_line >= self.progress_s:
                log(INFO, "Version %d: %d/%d contributions folded, %d training, %d sent so far", self._version + 1,
                    self._accumulator.count, self.buffer_size, len(self._in_flight), self._dispatched)
                last_line = now
            took = 0
            for message_id in list(self._in_flight):
                for reply in grid.pull_messages([message_id]):  # one at a time: one reply in memory
                    job = self._in_flight.pop(reply.metadata.reply_to_message_id, None)
                    if job is not None:
                        self._unusable = 0 if self._take(reply, job) else self._unusable + 1
                        took += 1
                    del reply
                    if self._accumulator.count >= self.buffer_size:
                        self._fuse(grid)
                if self._version >= num_rounds:
                    break
            self._expire()
            if self._unusable >= 3 * len(contributing):  # no reply a version could use, over and over: stop
                problems = (self._record.failures + self._record.rejections)[-3:]
                raise FederationError(f"version {self._version + 1}: the last {self._unusable} replies could not be "
                                      f"used, e.g. {'; '.join(problems)}")
            if not took:
                time.sleep(self.poll_s)
        if self._in_flight:
            log(INFO, "Done after version %d: %d job(s) still training are not waited for", self._version,
                len(self._in_flight))
        self._result.arrays = self._arrays
        return self._result

    # ------------------------------------------------------------------ the versions
    def _set_base(self, arrays: ArrayRecord) -> None:
        self._arrays, self._base_state, self._wire_arrays = arrays, to_state_dict(arrays), self._wire(arrays)

    def _open_version(self) -> None:
        self._record = RoundRecord(self._version + 1, mode="async")
        self._accumulator = self.fusion.start(self._base_state, self._version + 1)
        self._version_norms: list[float] = []
        self._contributed: set[int] = set()
        self._version_started = time.perf_counter()

    def _fuse(self, grid: Grid) -> None:
        """The buffer is full: the next version, checkpointed (``on_round``) and scored when due."""
        record = self._record
        state_before = dict(self.fusion.state_dict())
        fused = self._accumulator.finish()
        try:
            assert_finite(fused, f"version {self._version + 1}")
        except ValueError as exc:  # never a non-finite base: the version is refused, its contributions lost
            log(WARNING, "%s: keeping the previous base", exc)
            self.fusion.load_state_dict(state_before)
            failures = record.failures + [str(exc)]
            self._open_version()
            self._record.failures = failures
            return
        self._version += 1
        arrays = ArrayRecord(fused)
        record.fused, record.fusion, record.base_round = True, self.fusion.describe(), self._version
        record.dispatched = self._dispatched
        record.seconds_train = time.perf_counter() - self._version_started
        self.reference_norms = list(self._version_norms)
        log(INFO, "Version %d fused from %s (staleness %s)", self._version, ", ".join(record.fused_contributors),
            ", ".join(str(record.staleness[c]) for c in record.fused_contributors))
        self._set_base(arrays)
        self.evaluate_round(grid, self._version, arrays, self._eval_config, self._timeouts["eval"],
                            self._num_versions, self._result)
        self._emit(arrays)
        self._open_version()

    def _emit(self, arrays: ArrayRecord) -> None:
        record = self._record
        record.heads_fresh.sort()
        if self.on_round is not None:
            self.on_round(record, arrays)

    # ------------------------------------------------------------------ jobs
    def _dispatch(self, grid: Grid) -> None:
        """Send work with the newest base until ``concurrency`` jobs are in flight (a seeded draw among the idle
        contributing nodes that have not contributed to this version)."""
        busy = {job.node_id for job in self._in_flight.values()}
        idle = sorted((n for n, t in self.nodes.items() if t.role == "contributing" and n not in busy
                       and n not in self._contributed), key=lambda n: self.nodes[n].label)
        while len(self._in_flight) < self.concurrency and idle:
            node_id = idle.pop(self.rng.randrange(len(idle)))
            self._dispatched += 1
            config = ConfigRecord({**dict(self._train_config), "base-version": self._version, "send-update": 1})
            [message] = self._messages([node_id], self._wire_arrays, config, self._dispatched, MessageType.TRAIN)
            self._record.bytes_train_sent += array_bytes(message.content)
            [message_id] = grid.push_messages([message])
            if message_id:
                self._in_flight[message_id] = Job(self._dispatched, node_id, self.nodes[node_id].label,
                                                  self._version, time.monotonic())
            else:
                self._record.failures.append(f"{self.nodes[node_id].label}: Flower could not push job "
                                             f"{self._dispatched}")

    def _expire(self) -> None:
        """Jobs older than ``federation.train_timeout_s`` are given up (their node may be sent work again)."""
        now = time.monotonic()
        for message_id, job in list(self._in_flight.items()):
            if now - job.sent_at > self._timeouts["train"]:
                del self._in_flight[message_id]
                self._record.failures.append(f"{job.label}: job {job.number}: no reply within "
                                             "federation.train_timeout_s")

    def _take(self, reply: Message, job: Job) -> bool:
        """One reply: validated, then folded into this version with its staleness weight (True), or recorded with
        the reason it was not (False)."""
        record, label = self._record, job.label
        record.contributors.append(label)
        if reply.has_content():
            record.bytes_train_received += array_bytes(reply.content)
        if reply.has_error():
            record.failures.append(f"{label}: job {job.number}: error reply: {first_line(reply.error.reason)}")
            return False
        try:
            parsed = read_train_reply(reply, consume=True)
            update = decode(parsed.body, self.transport, {k: v.dtype for k, v in self._base_state.items()})
        except (MalformedReply, TransportError) as exc:
            record.failures.append(f"{label}: job {job.number}: malformed reply: {first_line(str(exc))}")
            return False
        staleness = self._version - job.version
        problem = None
        if reply.metadata.src_node_id != job.node_id:
            problem = f"reply from node {reply.metadata.src_node_id} to a job sent to node {job.node_id}"
        elif parsed.round != job.number:
            problem = f"reply says it answers job {parsed.round}, but it was sent job {job.number}"
        elif self.max_staleness is not None and staleness > self.max_staleness:
            problem = (f"staleness {staleness} > asynchronous.max_staleness {self.max_staleness} (trained on version "
                       f"{job.version}, the base is version {self._version})")
        norm, body = None, rebased(update, self._base_state)
        if problem is None:
            problem, norm = inspect(body, self._base_state)
        if problem is None:
            rule = NormRule(self.max_update_norm, self.max_relative_norm, tuple(self.reference_norms), self.min_peers,
                            self.min_reference_norm)
            problem, note = rule.judge(norm, self._version_norms)
            if note:
                record.notes.append(f"{label}: {note}")
        if problem is not None:
            record.rejections.append(str(Rejection(job.node_id, label, problem)))
            log(WARNING, "Version %d skipped a contribution: %s", self._version + 1, record.rejections[-1])
            return False
        record.train_loss[label], record.train_examples[label] = parsed.loss, parsed.examples
        if parsed.head_kept is False:
            record.heads_fresh.append(label)
        weight, factor = fold_terms(self.aggregation, self.staleness_rule, staleness, self.server_lr)
        if factor != 1.0:  # base + factor * update, written over the body judged above (no second body)
            for key, value in body.items():
                if self._base_state[key].is_floating_point():
                    torch.add(self._base_state[key], update[key], alpha=factor, out=value)
        self._accumulator.fold(body, label=label, examples=parsed.examples, weight=weight)
        self._version_norms.append(norm)
        self._contributed.add(job.node_id)
        record.fused_contributors.append(label)
        record.update_norms[label] = round(norm, 6)
        record.staleness[label], record.jobs[label] = staleness, job.number
        return True
