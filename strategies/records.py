"""The round record: the one schema that the strategy writes and everything else reads.

One :class:`RoundRecord` per round is one line of a run's ``metrics.jsonl`` and one entry of the history in
its checkpoint; the report, the sweep summary, the model card and a resumed strategy all read it back
through :func:`read_records`, which accepts every version written so far and refuses newer ones.

Versions (``schema`` in every record; records without it are version 1):

* 1: the first released layout (no ``schema`` or ``regression``; ``base_round`` only in its later files);
* 2: adds ``schema``, the array bytes sent and received per phase (``bytes_*``; None for version 1), ``fusion`` (the operator and parameters that fused the round; ``uniform_mean`` for
  version 1), ``base_round`` (the round whose fusion produced the base in effect, derived for version 1
  from ``fused`` and ``rolled_back``) and ``regression`` (the tasks scored by Pearson r, derived for version 1
  from the metric names in ``scores``);
* 3: adds the asynchronous mode's fields (``mode``; ``staleness``, ``jobs`` and ``dispatched``, empty or 0 in a
  synchronous run and in older files). In an asynchronous run a record is one base **version**: ``round`` is
  the version's number;
* 4: adds ``dev``: each score series' role means on the views' dev rows (``DEV_SERIES``), the only scores that
  decisions read (back-tracking, the best round); empty in older files, whose decisions read test scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from statistics import mean
from typing import Any

from tasks.metrics import PRIMARY_METRICS, primary

SCHEMA_VERSION = 4
ROLES = ("contributing", "heldout")  # "seen" and "unseen" in the paper's words

# Score series of a record: field -> (the evaluation view it comes from, the prefix of its metrics in that
# view). The probe view scores two poolings in one pass; the first-token probe is the paper's ColD-Frozen view.
SERIES = {"probe": ("probe", ""), "probe_mean_pool": ("probe", "mean_pool_"), "finetune": ("finetune", "")}
# The same series scored on each view's dev rows (tasks.splits.fit_dev: disjoint from the fit rows and from test):
# series -> the prefix of its metrics in the view. What is reported stays on test; what is decided reads these.
DEV_SERIES = {"probe": "dev_", "probe_mean_pool": "dev_mean_pool_", "finetune": "dev_"}


class RecordError(ValueError):
    """A record that cannot be read; the message says which round and why."""


@dataclass
class RoundRecord:
    """Everything that happened in one round.

    Contributors are named by label (the task, or ``task#i`` when several nodes hold one task); scores are per
    task (the mean over the task's nodes that answered).
    """

    round: int
    schema: int = SCHEMA_VERSION
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
    fusion: dict[str, Any] = field(default_factory=dict)  # the operator and parameters that fused this round
    rolled_back: bool = False  # back-tracking undid this round's fusion
    base_round: int = 0  # the round whose fusion produced the base in effect after this round (0: the start model)
    roles: dict[str, str] = field(default_factory=dict)  # task -> contributing ("seen") | heldout ("unseen")
    regression: list[str] = field(default_factory=list)  # tasks scored by Pearson r: left out of the role means
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
    dev: dict[str, dict[str, float]] = field(default_factory=dict)  # series -> role -> mean primary score on dev rows
    few_shot: int | None = None  # held-out tasks trained on this many examples in the views
    # Array bytes sent to and received from nodes (bodies; Flower's serialised size), per phase; None: not recorded.
    bytes_train_sent: int | None = 0
    bytes_train_received: int | None = 0
    bytes_eval_sent: int | None = 0
    bytes_eval_received: int | None = 0
    seconds_train: float = 0.0
    seconds_eval: float = 0.0
    # mode=async (strategies.asynchronous): a record per base version. Each fused contribution's staleness (versions
    # fused between the base it trained on and this one) and its job (a number unique in the run: the order in
    # which work was sent); the jobs sent so far in the run.
    mode: str = "sync"
    staleness: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    dispatched: int = 0

    def summarise_scores(self, regression: set[str]) -> dict[str, float]:
        """From ``scores``: each series' primary score per task and its mean per role (regression tasks left out
        of the means, as in the paper); returns the means as ``<series>-<role>``."""
        summary = {}
        self.dev = {}
        for series, (view, prefix) in SERIES.items():
            per_task = self._primary_scores(view, prefix)
            setattr(self, series, per_task)
            dev = self._role_means(self._primary_scores(view, DEV_SERIES[series]), regression)
            if any(value is not None for value in dev.values()):
                self.dev[series] = dev
            for role, value in self._role_means(per_task, regression).items():
                setattr(self, f"{series}_{role}", value)
                if value is not None:
                    summary[f"{series}-{role}"] = value
        return summary

    def _primary_scores(self, view: str, prefix: str) -> dict[str, float]:
        """task -> primary score of the metrics of ``view`` named ``<prefix><metric>``."""
        per_task = {}
        for task, metrics in self.scores.get(view, {}).items():
            series_metrics = {m[len(prefix):]: v for m, v in metrics.items() if m.startswith(prefix)}
            if PRIMARY_METRICS & set(series_metrics):  # a reply may lack a series (e.g. an older client)
                per_task[task] = primary(series_metrics)
        return per_task

    def _role_means(self, per_task: Mapping[str, float], regression: set[str]) -> dict[str, float | None]:
        """role -> the mean over the role's classification tasks (None: none scored)."""
        means = {}
        for role in ROLES:
            values = [score for name, score in per_task.items()
                      if self.roles.get(name) == role and name not in regression]
            means[role] = mean(values) if values else None
        return means

    def series_mean(self, series: str, role: str) -> float | None:
        """The mean of a score series over the classification tasks of a role (None where it did not run)."""
        return getattr(self, f"{series}_{role}")

    def dev_mean(self, series: str, role: str) -> float | None:
        """The mean of a score series on the dev rows (DEV_SERIES) over a role's classification tasks: what
        decisions read (None where it did not run, or in a record older than schema 4)."""
        return self.dev.get(series, {}).get(role)

    def evaluated(self, series: str) -> bool:
        """Did this round score its base in ``series``, and does that base still stand (not rolled back)?"""
        return bool(getattr(self, series)) and not self.rolled_back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = {f.name for f in fields(RoundRecord)}


def read_records(raw: Iterable[Mapping[str, Any]]) -> list[RoundRecord]:
    """Typed records from their JSON form, any version up to :data:`SCHEMA_VERSION` (older ones upgraded)."""
    records: list[RoundRecord] = []
    for data in raw:
        if not isinstance(data, Mapping) or not isinstance(data.get("round"), int):
            raise RecordError(f"record {len(records) + 1}: expected an object with an integer 'round'")
        version = data.get("schema", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RecordError(f"round {data['round']}: record schema {version!r} is newer than this version of "
                              f"the project reads ({SCHEMA_VERSION}); upgrade coldfusion-flower")
        unknown = set(data) - FIELDS
        if unknown:
            raise RecordError(f"round {data['round']}: unknown record field(s) {sorted(unknown)} "
                              f"for schema version {version}")
        record = RoundRecord(**{k: v for k, v in data.items() if k != "schema"})
        if version < 2:
            if "base_round" not in data:  # written before back-tracking recorded it
                record.base_round = _v1_base_round(record, records[-1].base_round if records else 0)
            if "fused_contributors" not in data and record.fused:  # the first files: every contributor was fused
                record.fused_contributors = list(record.contributors)
            if record.fused:  # the only operator there was
                record.fusion = {"operator": "uniform_mean"}
            for phase in ("train", "eval"):  # not counted then
                for way in ("sent", "received"):
                    setattr(record, f"bytes_{phase}_{way}", data.get(f"bytes_{phase}_{way}"))
            record.regression = sorted({task for per_task in record.scores.values()
                                        for task, metrics in per_task.items() if "pearson" in metrics})
        records.append(record)
    return records


def _v1_base_round(record: RoundRecord, previous: int) -> int:
    return record.round if record.fused and not record.rolled_back else previous


def monitored_score(history: Sequence[RoundRecord], monitor: str) -> float | None:
    """The back-tracking reference after ``history``: the monitored probe mean **on dev rows** of the current
    base, i.e. of the last round that was not rolled back (a rolled-back round's score describes a base that was
    undone). Never a test score: a record older than schema 4 has no dev score, so it sets no reference."""
    scores = [r.dev_mean("probe", monitor) for r in history if not r.rolled_back]
    scores = [s for s in scores if s is not None]
    return scores[-1] if scores else None


def fused_norms(history: Sequence[RoundRecord]) -> list[float]:
    """Update norms of the contributions fused in the last fused round that stood (validation's reference norms):
    a rolled-back round's fusion was undone, so its norms describe no update of the base in effect."""
    for record in reversed(history):
        if record.fused and not record.rolled_back:
            return [float(record.update_norms[c]) for c in record.fused_contributors if c in record.update_norms]
    return []


def saved_model_record(records: Sequence[RoundRecord], series: str) -> RoundRecord | None:
    """The latest record whose ``series`` scores describe the saved model (the base after the last round), or
    None when no round scored that base in this series. After back-tracking that is an earlier round."""
    if not records:
        return None
    saved = records[-1].base_round
    for record in reversed(records):
        if record.base_round != saved:
            break
        if record.evaluated(series):
            return record
    return None


def task_scores(by_node: Mapping[int, Mapping[str, Mapping[str, float]]],
                names: Mapping[int, str]) -> dict[str, dict[str, dict[str, float]]]:
    """view -> task -> metric -> value: each metric averaged over the task's nodes that reported it."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for node_id, views in by_node.items():
        for view, metrics in views.items():
            per_task = collected.setdefault(view, {}).setdefault(names[node_id], {})
            for metric, value in metrics.items():
                per_task.setdefault(metric, []).append(value)
    return {view: {task: {m: mean(v) for m, v in metrics.items()} for task, metrics in sorted(tasks.items())}
            for view, tasks in collected.items()}
