"""The text of ``report.md``: run facts, verdicts, per-round and per-task markdown tables (shared with the model card)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.report.aggregate import (
    ROLES,
    VIEWS,
    evaluated,
    final_round,
    regression_tasks,
    row_means,
    task_roles,
    task_rows,
    verdict,
)
from app.report.runs import Run, cfg_get
from app.report.table import megabytes, pct
from strategies.records import RoundRecord

RECIPE_KEYS = ("lr", "batch_size", "max_steps", "epochs", "head_policy", "weight_decay", "warmup_ratio",
               "max_grad_norm")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gain_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _settings(mapping: Any) -> str:
    if not isinstance(mapping, Mapping) or not mapping:
        return "unknown"
    return ", ".join(f"{k}={'none' if v is None else v}" for k, v in mapping.items())


def recipe_text(client: Any) -> str:
    """The contributor recipe's essentials, plus any early-stopping setting the config has."""
    if not isinstance(client, Mapping):
        return "unknown"
    keys = [k for k in RECIPE_KEYS if k in client] + [k for k in client if "early" in k or "patience" in k]
    return _settings({k: client[k] for k in keys})


def fusion_text(records: Sequence[RoundRecord]) -> str:
    """The operators (with their parameters) that fused the run's rounds, in order of first use."""
    used: list[str] = []
    for record in records:
        if record.fused and record.fusion:
            params = {k: v for k, v in record.fusion.items() if k != "operator"}
            text = f"{record.fusion['operator']}" + (f" ({_settings(params)})" if params else "")
            if text not in used:
                used.append(text)
    return "; ".join(used) or "no round fused"


def eval_text(eval_cfg: Any) -> list[str]:
    if not isinstance(eval_cfg, Mapping):
        return ["unknown"]
    return [f"{name}: {_settings(v)}" if isinstance(v, Mapping) else f"{name}={v}" for name, v in eval_cfg.items()]


def backtrack_lines(config: Mapping[str, Any], records: Sequence[RoundRecord]) -> list[str]:
    """What back-tracking watched, and which rounds it undid (nothing when it was off)."""
    threshold = cfg_get(config, "backtrack.threshold")
    rolled = [r.round for r in records if r.rolled_back]
    if threshold is None and not rolled:
        return []
    monitor = cfg_get(config, "backtrack.monitor", "contributing")
    on_dev = any(r.dev for r in records)  # schema 4: back-tracking read dev rows; older runs read test rows
    lines = [f"Back-tracking: a round is undone when the mean first-token probe accuracy on {'dev' if on_dev else 'test'}"
             f" rows over the {monitor} datasets falls by more than {threshold}; rolled back: "
             f"{', '.join(map(str, rolled)) or 'none'}"]
    if monitor == "heldout":  # refused since; a run written before that
        lines.append("Warning: held-out (unseen) scores steered this run's training: every unseen figure is selected "
                     "on held-out data")
    elif not on_dev:
        lines.append("Warning: test scores steered this run's training (records older than schema 4): its figures "
                     "are selected on test data")
    if rolled:
        lines.append(f"The saved model is the base produced in round {records[-1].base_round}; a rolled-back "
                     "round's scores describe the undone base and are left out of 'final'")
    return lines


def async_lines(config: Mapping[str, Any], records: Sequence[RoundRecord]) -> list[str]:
    """For an asynchronous run: what a round means here (a base version), and the staleness of what was fused."""
    if not any(r.mode == "async" for r in records):
        return []
    stale = [s for r in records for s in r.staleness.values()]
    rejected = sum(1 for r in records for line in r.rejections if "max_staleness" in line)
    return [f"Mode: asynchronous (rounds are base versions): {_settings(cfg_get(config, 'asynchronous') or {})}",
            (f"Staleness of the fused contributions: mean {sum(stale) / len(stale):.2f}, max {max(stale)} "
             f"versions; {rejected} rejected as too stale; {records[-1].dispatched} jobs sent") if stale
            else "Staleness: no contribution fused yet"]


def pool_lines(roles: Mapping[str, str], regression: set[str], missing: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [] if roles else ["Task roles (seen/unseen) are not recorded in metrics.jsonl"]
    for role, word in ROLES.items() if roles else ():
        tasks = sorted(t for t, r in roles.items() if r == role)
        lines.append(f"{word.capitalize()} ({role}) datasets ({len(tasks)}): {', '.join(tasks) or 'none'}")
    if regression:
        lines.append(f"Regression datasets (Pearson r, left out of the means): {', '.join(sorted(regression))}")
    if missing:
        lines.append("Configured but not available: " + "; ".join(
            f"{m.get('name', '?')} ({m.get('role', '?')}: {m.get('reason', 'no reason given')})" for m in missing))
    return lines


def never_scored(records: Sequence[RoundRecord]) -> dict[str, str]:
    """Tasks of the pool that no record scores in any view -> the first failure recorded for them ("" if none).
    Such a task (its data failing on every node, say) is silently absent from every mean: name it."""
    scored = {task for r in records for per_task in r.scores.values() for task in per_task}
    failures = [f for r in records for f in r.failures]
    return {task: next((f for f in failures if f.startswith((f"{task}:", f"{task}#"))), "")
            for task in sorted(task_roles(records)) if task not in scored}


def never_scored_lines(records: Sequence[RoundRecord]) -> list[str]:
    """One line per task that never produced a score, with its first recorded failure."""
    return [f"{task}: never produced a score" + (f" (first failure: {why[:300]})" if why else "")
            for task, why in never_scored(records).items()]


def round_table(records: Sequence[RoundRecord]) -> str:
    """One row per round: contributors, each series' recorded seen/unseen means, and what happened."""
    rows = []
    for r in records:
        notes = ["start"] if r.round == 0 else []
        if r.staleness:
            notes.append(f"staleness {','.join(str(r.staleness[c]) for c in r.fused_contributors)}")
        if r.round and not r.fused:
            notes.append("not fused")
        if r.rolled_back:
            notes.append("rolled back")
        for key in ("failures", "rejections"):
            if getattr(r, key):
                notes.append(f"{len(getattr(r, key))} {key}")
        means = [pct(r.series_mean(v, role)) for v in VIEWS for role in ROLES]
        rows.append([r.round, len(r.contributors), *means, megabytes(r), ", ".join(notes)])
    headers = (["round", "contributors"] + [f"{v} {w}" for v in VIEWS for w in ROLES.values()]
               + ["MB out/in", "notes"])
    return md_table(headers, rows)


def task_section(records: Sequence[RoundRecord], view: str, roles: Mapping[str, str], regression: set[str],
                 baselines: Mapping[str, Sequence[RoundRecord]]) -> str:
    rows = task_rows(records, view, roles, regression, baselines)
    saved = final_round(records, view)
    title = (f"### {VIEWS[view]}: start (round 0) vs final (round {saved}, the saved model)" if saved is not None
             else f"### {VIEWS[view]}: start (round 0); final n/a (no round scored the saved model in this view)")
    names = list(baselines)
    body = [[r.task, ROLES.get(r.role, r.role), r.metric, pct(r.start), pct(r.final), gain_text(r.gain),
             *(pct(r.baselines[n]) for n in names)] for r in rows]
    for role, word in ROLES.items():
        means = row_means(rows, role, regression)
        body.append([f"**mean {word}**", word, "accuracy", pct(means["start"]), pct(means["final"]),
                     gain_text(means["gain"]), *(pct(means.get(n)) for n in names)])
    table = md_table(["task", "role", "metric", "start", "final", "gain", *names], body)
    gains = [r for r in rows if r.gain is not None]
    improved = [r for r in gains if r.gain > 0]
    by_role = ", ".join(f"{w} {sum(r.role == role for r in improved)} of {sum(r.role == role for r in gains)}"
                        for role, w in ROLES.items())
    count = (f"Improved over the start model: {len(improved)} of {len(gains)} tasks ({by_role})."
             if gains else "No task has both a round-0 and a final score in this view.")
    return f"{title}\n\n{table}\n\n{count}"


def report_markdown(run: Run, baselines: Mapping[str, Run], plots: Sequence[str]) -> str:
    """The whole report.md: facts of the run, a verdict per view, per-round and per-task tables, the plots."""
    records, config = run.records, run.config
    roles, regression = task_roles(records), regression_tasks(records)
    model = cfg_get(config, "model.name_or_path", "unknown")
    kind = cfg_get(config, "model.kind")
    facts = [
        f"Model: {model}" + (f" (kind: {kind})" if kind is not None else ""),
        (f"{'Versions' if records[-1].mode == 'async' else 'Rounds'}: {records[-1].round} done (configured: "
         f"{cfg_get(config, 'rounds', 'unknown')}), "
         + (f"{cfg_get(config, 'contributors_per_round', 'unknown')} contributors per round, "
            if records[-1].mode != "async" else "")
         + f"seed {cfg_get(config, 'seed', 'unknown')}"),
        *async_lines(config, records),
        f"Contributor recipe: {recipe_text(cfg_get(config, 'client'))}",
        f"Fusion: {fusion_text(records)}",
        *(f"Evaluation {line}" for line in eval_text(cfg_get(config, "eval"))),
        *backtrack_lines(config, records),
        *pool_lines(roles, regression, run.missing),
    ]
    few_shot = sorted({r.few_shot for r in records if r.few_shot is not None})
    if few_shot:
        facts.append(f"Few-shot: held-out datasets evaluated with k={', '.join(map(str, few_shot))} training examples")
    if not config:
        facts.append("config.yaml was not found: the facts above are unknown")
    facts += [f"Baseline **{name}**: {b.dir} (its last evaluated round per view)" for name, b in baselines.items()]
    views = [v for v in VIEWS if evaluated(records, v)]
    base_records = {name: b.records for name, b in baselines.items()}
    parts = [
        f"# ColD Fusion run report: {run.dir.resolve().name}",
        ("Scores are percentages (accuracy; Pearson r x 100 for regression); gains are in points. "
         "Seen/unseen means cover classification datasets only."),
        "## Run", "\n".join(f"- {f}" for f in facts),
        "## Verdict", "\n".join(f"- {verdict(records, v)}" for v in VIEWS),
        "## Per round", round_table(records),
        "## Per task", *(task_section(records, v, roles, regression, base_records) for v in views),
    ]
    unscored = never_scored_lines(records)
    if unscored:
        parts += ["## Tasks never scored", "\n".join(f"- {line}" for line in unscored)]
    if plots:
        parts += ["## Plots", *(f"![{Path(p).stem}]({p})" for p in plots)]
    return "\n\n".join(parts) + "\n"
