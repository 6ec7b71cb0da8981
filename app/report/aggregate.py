"""Pure functions of typed round records: score series, start/final/best points, task rows, baseline means, long rows, verdicts.

Two evaluation views (docs/coldfusion.md, "Evaluation") give three score series (``strategies.records.SERIES``):
``probe`` (ColD-Frozen: a linear probe on the frozen body's first token, the paper's view), ``probe_mean_pool``
(the same probe on mean-pooled tokens) and ``finetune`` (ColD: the whole model finetuned with a fresh head).
Seen = contributing datasets, unseen = held-out ones.

"Final" always describes the **saved model** (the base after the last round): the scores of the latest round
that evaluated that very base (``strategies.records.saved_model_record``). When the last rounds were rolled
back by back-tracking, that is an earlier round; a series that never scored the saved base has no final.
Role means are the ones each record holds (classification datasets only; regression, e.g. STS-B, is left
out, as in the paper); nothing here re-derives what a record already says.

"Best" is a decision, so it reads dev rows, never test: the round with the highest role mean on the views' dev
rows (``RoundRecord.dev``), reported with that round's test score. Records older than schema 4 have no dev
scores, so they have no best.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.report.table import pct
from strategies import records as schema
from strategies.records import RoundRecord, saved_model_record

# Score series of a record (strategies.records.SERIES) and how the report names them.
VIEWS = {"probe": "Linear probe, first token (ColD-Frozen)", "probe_mean_pool": "Linear probe, mean pooling",
         "finetune": "Full finetune (ColD)"}
ROLES = dict(zip(schema.ROLES, ("seen", "unseen")))  # the record's role -> the paper's word
assert set(VIEWS) == set(schema.SERIES), "every score series of the record schema has a name here"

Point = tuple[int, float]  # (round, value)


@dataclass(frozen=True)
class TaskRow:
    """One task of one view: its primary score at the start (round 0), at the final round, and per baseline."""

    task: str
    role: str
    metric: str
    start: float | None
    final: float | None
    baselines: dict[str, float | None]

    @property
    def gain(self) -> float | None:
        return None if self.start is None or self.final is None else self.final - self.start


def evaluated(records: Sequence[RoundRecord], view: str) -> list[RoundRecord]:
    """Rounds where the view ran and whose base still stands (a rolled-back round's scores describe a base
    that was undone); each view has its own schedule."""
    return [r for r in records if r.evaluated(view)]


def final_round(records: Sequence[RoundRecord], view: str) -> int | None:
    """The round whose ``view`` scores describe the saved model, or None when no round scored it."""
    record = saved_model_record(records, view)
    return None if record is None else record.round


def task_roles(records: Sequence[RoundRecord]) -> dict[str, str]:
    """Role of every task of the pool, as the records state it (a later record's word wins)."""
    roles: dict[str, str] = {}
    for record in records:
        roles.update(record.roles)
    return roles


def regression_tasks(records: Sequence[RoundRecord]) -> set[str]:
    """Tasks scored by Pearson r, as the records state them: shown per task but left out of the means."""
    return {task for record in records for task in record.regression}


def role_mean(scores: Mapping[str, float], roles: Mapping[str, str], regression: set[str],
              role: str) -> float | None:
    """The mean of ``scores`` over one role's classification tasks (for a baseline under this run's roles)."""
    values = [v for t, v in scores.items() if roles.get(t) == role and t not in regression and v is not None]
    return sum(values) / len(values) if values else None


def mean_series(records: Sequence[RoundRecord], view: str, role: str) -> list[Point]:
    """(round, recorded role mean) for every round that evaluated ``view`` and has that mean."""
    series = [(r.round, r.series_mean(view, role)) for r in evaluated(records, view)]
    return [(n, v) for n, v in series if v is not None]


def dev_series(records: Sequence[RoundRecord], view: str, role: str) -> list[Point]:
    """(round, role mean on dev rows) for every round that evaluated ``view``, whose base stands, with that mean."""
    series = [(r.round, r.dev_mean(view, role)) for r in evaluated(records, view)]
    return [(n, v) for n, v in series if v is not None]


def role_summary(series: Sequence[Point], final: int | None, dev: Sequence[Point] = ()) -> dict[str, Point | None]:
    """Start (round 0), final (the saved model's round ``final``, or None) and best point of one test mean series;
    best: the test point of the round with the highest ``dev`` mean (the first such round), None without dev."""
    test = dict(series)
    chosen = [p for p in dev if p[0] in test]
    best = max(chosen, key=lambda p: p[1])[0] if chosen else None
    return {"start": next((p for p in series if p[0] == 0), None),
            "final": next((p for p in series if p[0] == final), None),
            "best": (best, test[best]) if best is not None else None}


def summarise_series(records: Sequence[RoundRecord], view: str, role: str) -> dict[str, Point | None]:
    return role_summary(mean_series(records, view, role), final_round(records, view), dev_series(records, view, role))


def last_scores(records: Sequence[RoundRecord], view: str) -> dict[str, float]:
    """A run's final score per task: the saved model's (round 0 for a rounds=0 baseline run)."""
    record = saved_model_record(records, view)
    return dict(getattr(record, view)) if record else {}


def task_rows(records: Sequence[RoundRecord], view: str, roles: Mapping[str, str], regression: set[str],
              baselines: Mapping[str, Sequence[RoundRecord]] | None = None) -> list[TaskRow]:
    """Per task: start (round 0) vs final (the saved model) of this view, plus each baseline's score."""
    start = next((dict(getattr(r, view)) for r in evaluated(records, view) if r.round == 0), {})
    final = last_scores(records, view)
    others = {name: last_scores(recs, view) for name, recs in (baselines or {}).items()}
    order = list(ROLES)
    tasks = sorted(set(start) | set(final),
                   key=lambda t: (order.index(roles[t]) if roles.get(t) in order else len(order), t))
    return [TaskRow(t, roles.get(t, "unknown"), "pearson" if t in regression else "accuracy",
                    start.get(t), final.get(t), {n: s.get(t) for n, s in others.items()}) for t in tasks]


def row_means(rows: Sequence[TaskRow], role: str, regression: set[str]) -> dict[str, float | None]:
    """Column means over the role's classification tasks (each column over the tasks it has a value for)."""
    rows = [r for r in rows if r.role == role and r.task not in regression]

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    names = rows[0].baselines if rows else {}
    return {"start": mean([r.start for r in rows]), "final": mean([r.final for r in rows]),
            "gain": mean([r.gain for r in rows]), **{n: mean([r.baselines[n] for r in rows]) for n in names}}


def baseline_means(records: Sequence[RoundRecord], view: str, roles: Mapping[str, str],
                   regression: set[str]) -> dict[str, float]:
    """A baseline's seen/unseen means under *this* run's roles, so both are averaged over the same tasks."""
    scores = last_scores(records, view)
    means = {role: role_mean(scores, roles, regression, role) for role in ROLES}
    return {role: v for role, v in means.items() if v is not None}


def long_rows(records: Sequence[RoundRecord], roles: Mapping[str, str]) -> list[tuple]:
    """(round, view, task, role, metric, value) for every metric of ``scores``; a series without its own
    entry in ``scores`` (the mean-pooled probe, older records): its primary score."""
    rows = []
    for record in records:
        round_roles = {**roles, **record.roles}
        for view in VIEWS:
            per_task = record.scores.get(view) or {t: {"primary": v} for t, v in getattr(record, view).items()}
            for task in sorted(per_task):
                for metric, value in per_task[task].items():
                    rows.append((record.round, view, task, round_roles.get(task, "unknown"), metric, value))
    return rows


def verdict(records: Sequence[RoundRecord], view: str) -> str:
    """One plain sentence per view: does the final model beat round 0 on held-out (else seen) datasets?"""
    label = VIEWS[view]
    for role, word in (("heldout", "held-out"), ("contributing", "contributing")):
        points = summarise_series(records, view, role)
        start, final = points["start"], points["final"]
        if start is not None and final is not None and final[0] != 0:
            break
    else:
        if final_round(records, view) is None and evaluated(records, view):
            return f"{label}: n/a: no round scored the saved model in this view, so there is no verdict."
        return f"{label}: not evaluated at round 0 and at a later round, so there is no verdict."
    gain = 100 * (final[1] - start[1])
    detail = f"mean accuracy {pct(final[1])} at round {final[0]} vs {pct(start[1])} at round 0"
    if round(gain, 1) > 0:
        return f"{label}: the fused model beats the start model on {word} datasets by {gain:+.1f} points ({detail})."
    return f"{label}: the fused model does not beat the start model on {word} datasets ({gain:+.1f} points; {detail})."
