"""Per-run reports: a long CSV of every score, three plots, a markdown report and a model card.

Everything is derived from what a run directory already holds (``config.yaml``, ``metrics.jsonl``,
``pool.json``), so a report can be made, or made again, for a finished or an interrupted run without Flower
or a model in memory. Tables and aggregates are pure functions of the records; plotting and writing files
stay at the edge. Nothing is stated that was not computed from those files.

Two evaluation views (docs/coldfusion.md, "Evaluation"): ``probe`` (ColD-Frozen, linear probe on the frozen
body; the first-token probe is the paper's, ``probe_mean_pool`` is the same probe on mean-pooled tokens) and
``finetune`` (ColD, whole model finetuned with a fresh head). Seen = contributing datasets, unseen = held-out
ones.

"Final" always describes the **saved model** (the base after the last round): the scores of the latest round
that evaluated that very base. When the last rounds were rolled back by back-tracking, that is an earlier
round; a view that never scored the saved base reads n/a (and the report says so). Means cover classification datasets only (regression, e.g. STS-B, is left out, as in
the paper and in the server's own ``*_contributing`` / ``*_heldout`` means).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app.run.outputs import METRICS_FILE, pct, read_metrics, render_table

# Score series of a record (strategies.coldfusion.SERIES): the probe view gives two, one per pooling.
VIEWS = {"probe": "Linear probe, first token (ColD-Frozen)", "probe_mean_pool": "Linear probe, mean pooling",
         "finetune": "Full finetune (ColD)"}
ROLES = {"contributing": "seen", "heldout": "unseen"}
ROLE_COLORS = {"contributing": "tab:blue", "heldout": "tab:orange"}
# Names of conf/model/*.yaml that are not Hugging Face ids: the Hub id they stand for, or None (no hub model).
MODEL_ALIASES: dict[str, str | None] = {"tiny": None, "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
RECIPE_KEYS = ("lr", "batch_size", "max_steps", "epochs", "head_policy", "weight_decay", "warmup_ratio",
               "max_grad_norm")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportError(ValueError):
    """A run directory or an argument that cannot be reported on; the message names the file or argument."""


@dataclass(frozen=True)
class Run:
    """What a run directory holds, read once: the resolved config, the per-round records, the missing datasets."""

    dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    missing: list[dict[str, Any]]


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


# ----------------------------------------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing or corrupt metrics file is a ReportError naming the file."""
    path = Path(run_dir).expanduser()
    metrics = path / METRICS_FILE
    try:
        records = read_metrics(path)
    except FileNotFoundError:
        raise ReportError(f"{metrics}: not found (is {path} a run directory?)") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{metrics}: cannot be read: {exc}") from None
    if not records or not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in records):
        raise ReportError(f"{metrics}: expected one JSON object with an integer 'round' per line")
    return Run(path, _load_config(path / "config.yaml"), records, _load_missing(path / "pool.json"))


def _load_config(path: Path) -> dict[str, Any]:
    """The resolved config; a run without one still gets a report (its facts then read 'unknown')."""
    if not path.exists():
        return {}
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ReportError(f"{path}: cannot be read: {exc}") from None
    return config if isinstance(config, dict) else {}


def _load_missing(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        missing = json.loads(path.read_text()).get("missing") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ReportError(f"{path}: cannot be read: {exc}") from None
    return [m for m in missing if isinstance(m, dict)]


# ------------------------------------------------------------------------------------ pure aggregation


def cfg_get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def evaluated(records: Sequence[Mapping[str, Any]], view: str) -> list[Mapping[str, Any]]:
    """Rounds where the view ran: each view has its own schedule, and an empty dict means it did not run.
    A rolled-back round's scores describe a base that was undone, so they are left out."""
    return [r for r in records if r.get(view) and not r.get("rolled_back")]


def base_rounds(records: Sequence[Mapping[str, Any]]) -> list[int]:
    """For each record, the round whose fusion produced the base in effect after it (0: the start model);
    derived from ``fused`` / ``rolled_back`` for records written before ``base_round`` existed."""
    rounds, current = [], 0
    for record in records:
        if "base_round" in record:
            current = int(record["base_round"])
        elif record.get("fused") and not record.get("rolled_back"):
            current = int(record["round"])
        rounds.append(current)
    return rounds


def saved_model_record(records: Sequence[Mapping[str, Any]], view: str) -> Mapping[str, Any] | None:
    """The latest record whose ``view`` scores describe the saved model (the base after the last round),
    or None when no round scored that base in this view."""
    if not records:
        return None
    produced = base_rounds(records)
    saved = produced[-1]
    for record, base_round in zip(reversed(records), reversed(produced)):
        if base_round != saved:
            break
        if record.get(view) and not record.get("rolled_back"):
            return record
    return None


def final_round(records: Sequence[Mapping[str, Any]], view: str) -> int | None:
    record = saved_model_record(records, view)
    return None if record is None else int(record["round"])


def task_roles(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Role of every task of the pool; older records without ``roles`` fall back to the config's lists."""
    roles: dict[str, str] = {}
    for record in records:
        roles.update(record.get("roles") or {})
    if not roles and config:
        for role in ROLES:
            roles.update({str(t): role for t in cfg_get(config, f"tasks.{role}") or []})
    return roles


def regression_tasks(records: Sequence[Mapping[str, Any]]) -> set[str]:
    """Tasks scored by Pearson r: shown per task but left out of the seen/unseen means."""
    return {task for r in records for per_task in (r.get("scores") or {}).values()
            for task, metrics in per_task.items() if "pearson" in metrics}


def role_mean(scores: Mapping[str, float], roles: Mapping[str, str], regression: set[str],
              role: str) -> float | None:
    values = [v for t, v in scores.items() if roles.get(t) == role and t not in regression and v is not None]
    return sum(values) / len(values) if values else None


def view_mean(record: Mapping[str, Any], view: str, role: str, roles: Mapping[str, str],
              regression: set[str]) -> float | None:
    """The server's own mean when recorded, so the report never disagrees with metrics.jsonl; else the same rule."""
    if record.get(f"{view}_{role}") is not None:
        return record[f"{view}_{role}"]
    return role_mean(record.get(view) or {}, roles, regression, role)


def mean_series(records: Sequence[Mapping[str, Any]], view: str, role: str, roles: Mapping[str, str],
                regression: set[str]) -> list[tuple[int, float]]:
    series = [(r["round"], view_mean(r, view, role, roles, regression)) for r in evaluated(records, view)]
    return [(n, v) for n, v in series if v is not None]


def role_summary(series: Sequence[tuple[int, float]], final: int | None) -> dict[str, tuple[int, float] | None]:
    """Start (round 0), final (the saved model's round ``final``, or None) and best point of one mean series."""
    return {"start": next((p for p in series if p[0] == 0), None),
            "final": next((p for p in series if p[0] == final), None),
            "best": max(series, key=lambda p: p[1]) if series else None}


def summarise_series(records: Sequence[Mapping[str, Any]], view: str, role: str, roles: Mapping[str, str],
                     regression: set[str]) -> dict[str, tuple[int, float] | None]:
    return role_summary(mean_series(records, view, role, roles, regression), final_round(records, view))


def last_scores(records: Sequence[Mapping[str, Any]], view: str) -> dict[str, float]:
    """A run's final score per task: the saved model's (round 0 for a rounds=0 baseline run)."""
    record = saved_model_record(records, view)
    return dict(record[view]) if record else {}


def task_rows(records: Sequence[Mapping[str, Any]], view: str, roles: Mapping[str, str], regression: set[str],
              baselines: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[TaskRow]:
    """Per task: start (round 0) vs final (the saved model) of this view, plus each baseline's score."""
    runs = evaluated(records, view)
    start = next((dict(r[view]) for r in runs if r["round"] == 0), {})
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


def baseline_means(records: Sequence[Mapping[str, Any]], view: str, roles: Mapping[str, str],
                   regression: set[str]) -> dict[str, float]:
    """A baseline's seen/unseen means under *this* run's roles, so both are averaged over the same tasks."""
    scores = last_scores(records, view)
    means = {role: role_mean(scores, roles, regression, role) for role in ROLES}
    return {role: v for role, v in means.items() if v is not None}


def long_rows(records: Sequence[Mapping[str, Any]], roles: Mapping[str, str]) -> list[tuple]:
    """(round, view, task, role, metric, value) for every metric of ``scores``; older records: the primary score."""
    rows = []
    for record in records:
        round_roles = {**roles, **(record.get("roles") or {})}
        for view in VIEWS:
            per_task = (record.get("scores") or {}).get(view) or {
                t: {"primary": v} for t, v in (record.get(view) or {}).items()}
            for task in sorted(per_task):
                for metric, value in per_task[task].items():
                    rows.append((record["round"], view, task, round_roles.get(task, "unknown"), metric, value))
    return rows


def verdict(records: Sequence[Mapping[str, Any]], view: str, roles: Mapping[str, str],
            regression: set[str]) -> str:
    """One plain sentence per view: does the final model beat round 0 on held-out (else seen) datasets?"""
    label = VIEWS[view]
    for role, word in (("heldout", "held-out"), ("contributing", "contributing")):
        points = summarise_series(records, view, role, roles, regression)
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


# ----------------------------------------------------------------------------------------------- text


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _gain(value: float | None) -> str:
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


def eval_text(eval_cfg: Any) -> list[str]:
    if not isinstance(eval_cfg, Mapping):
        return ["unknown"]
    return [f"{name}: {_settings(v)}" if isinstance(v, Mapping) else f"{name}={v}" for name, v in eval_cfg.items()]


def base_model_id(name: Any) -> str | None:
    """A Hub id or path for the model card's ``base_model``; project aliases map to their Hub id or to nothing."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        return None
    return MODEL_ALIASES.get(name, name) if name in MODEL_ALIASES else name


def backtrack_lines(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """What back-tracking watched, and which rounds it undid (nothing when it was off)."""
    threshold = cfg_get(config, "backtrack.threshold")
    rolled = [r["round"] for r in records if r.get("rolled_back")]
    if threshold is None and not rolled:
        return []
    monitor = cfg_get(config, "backtrack.monitor", "contributing")
    lines = [f"Back-tracking: a round is undone when the mean first-token probe accuracy over the {monitor} "
             f"datasets falls by more than {threshold}; rolled back: {', '.join(map(str, rolled)) or 'none'}"]
    saved = base_rounds(records)[-1] if records else 0
    if rolled:
        lines.append(f"The saved model is the base produced in round {saved}; a rolled-back round's scores "
                     "describe the undone base and are left out of 'final'")
    return lines


def pool_lines(roles: Mapping[str, str], regression: set[str], missing: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [] if roles else ["Task roles (seen/unseen) are not recorded in metrics.jsonl nor listed in config.yaml"]
    for role, word in ROLES.items() if roles else ():
        tasks = sorted(t for t, r in roles.items() if r == role)
        lines.append(f"{word.capitalize()} ({role}) datasets ({len(tasks)}): {', '.join(tasks) or 'none'}")
    if regression:
        lines.append(f"Regression datasets (Pearson r, left out of the means): {', '.join(sorted(regression))}")
    if missing:
        lines.append("Configured but not available: " + "; ".join(
            f"{m.get('name', '?')} ({m.get('role', '?')}: {m.get('reason', 'no reason given')})" for m in missing))
    return lines


def round_table(records: Sequence[Mapping[str, Any]], roles: Mapping[str, str], regression: set[str]) -> str:
    rows = []
    for r in records:
        notes = ["start"] if r["round"] == 0 else []
        if r["round"] and r.get("fused") is False:
            notes.append("not fused")
        if r.get("rolled_back"):
            notes.append("rolled back")
        for key in ("failures", "rejections"):
            if r.get(key):
                notes.append(f"{len(r[key])} {key}")
        means = [pct(view_mean(r, v, role, roles, regression)) for v in VIEWS for role in ROLES]
        rows.append([r["round"], len(r.get("contributors") or []), *means, ", ".join(notes)])
    headers = ["round", "contributors"] + [f"{v} {w}" for v in VIEWS for w in ROLES.values()] + ["notes"]
    return md_table(headers, rows)


def task_section(records: Sequence[Mapping[str, Any]], view: str, roles: Mapping[str, str], regression: set[str],
                 baselines: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    rows = task_rows(records, view, roles, regression, baselines)
    saved = final_round(records, view)
    title = (f"### {VIEWS[view]}: start (round 0) vs final (round {saved}, the saved model)" if saved is not None
             else f"### {VIEWS[view]}: start (round 0); final n/a (no round scored the saved model in this view)")
    names = list(baselines)
    body = [[r.task, ROLES.get(r.role, r.role), r.metric, pct(r.start), pct(r.final), _gain(r.gain),
             *(pct(r.baselines[n]) for n in names)] for r in rows]
    for role, word in ROLES.items():
        means = row_means(rows, role, regression)
        body.append([f"**mean {word}**", word, "accuracy", pct(means["start"]), pct(means["final"]),
                     _gain(means["gain"]), *(pct(means.get(n)) for n in names)])
    table = md_table(["task", "role", "metric", "start", "final", "gain", *names], body)
    gains = [r for r in rows if r.gain is not None]
    improved = [r for r in gains if r.gain > 0]
    by_role = ", ".join(f"{w} {sum(r.role == role for r in improved)} of {sum(r.role == role for r in gains)}"
                        for role, w in ROLES.items())
    count = (f"Improved over the start model: {len(improved)} of {len(gains)} tasks ({by_role})."
             if gains else "No task has both a round-0 and a final score in this view.")
    return f"{title}\n\n{table}\n\n{count}"


def report_markdown(run: Run, baselines: Mapping[str, Run], plots: Sequence[str]) -> str:
    records, config = run.records, run.config
    roles, regression = task_roles(records, config), regression_tasks(records)
    done = records[-1]["round"]
    model = cfg_get(config, "model.name_or_path", "unknown")
    kind = cfg_get(config, "model.kind")
    facts = [
        f"Model: {model}" + (f" (kind: {kind})" if kind is not None else ""),
        (f"Rounds: {done} done (configured: {cfg_get(config, 'rounds', 'unknown')}), "
         f"{cfg_get(config, 'contributors_per_round', 'unknown')} contributors per round, "
         f"seed {cfg_get(config, 'seed', 'unknown')}"),
        f"Contributor recipe: {recipe_text(cfg_get(config, 'client'))}",
        *(f"Evaluation {line}" for line in eval_text(cfg_get(config, "eval"))),
        *backtrack_lines(config, records),
        *pool_lines(roles, regression, run.missing),
    ]
    few_shot = sorted({r["few_shot"] for r in records if r.get("few_shot") is not None})
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
        "## Verdict", "\n".join(f"- {verdict(records, v, roles, regression)}" for v in VIEWS),
        "## Per round", round_table(records, roles, regression),
        "## Per task", *(task_section(records, v, roles, regression, base_records) for v in views),
    ]
    if plots:
        parts += ["## Plots", *(f"![{Path(p).stem}]({p})" for p in plots)]
    return "\n\n".join(parts) + "\n"


def model_card(model_dir: str | Path, config: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
               missing: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The README.md text of the fused model: Hub metadata header, then what it is and what was measured."""
    roles, regression = task_roles(records, config), regression_tasks(records)
    name = cfg_get(config, "model.name_or_path")
    base = base_model_id(name)
    done = records[-1]["round"] if records else 0
    ordered = [t for role in ROLES for t in sorted(t for t, r in roles.items() if r == role)]
    results, score_rows = [], []
    for view, label in VIEWS.items():
        for role, word in ROLES.items():
            points = summarise_series(records, view, role, roles, regression)
            start, final = points["start"], points["final"]
            if final is None:
                if evaluated(records, view) and start is not None:  # scored, but never the saved model
                    score_rows.append([label, word, pct(start[1]), "n/a (saved model not scored)", "-", "-"])
                continue
            change = _gain(final[1] - start[1]) if start is not None else "-"
            score_rows.append([label, word, pct(start[1]) if start else "-", pct(final[1]), final[0], change])
            results.append({
                "task": {"type": "text-classification", "name": label},
                "dataset": {"type": "coldfusion-pool", "name": f"{word} datasets ({role})"},
                "metrics": [{"type": "accuracy", "value": round(100 * final[1], 2),
                             "name": f"mean accuracy, {word} datasets, round {final[0]}"}]})
    meta: dict[str, Any] = {"library_name": "transformers"}
    if base:
        meta["base_model"] = base
    meta |= {"tags": ["coldfusion", "federated-learning", "flower", "text-classification"],
             "pipeline_tag": "feature-extraction", "datasets": ordered}
    if results:
        meta["model-index"] = [{"name": f"coldfusion-{Path(str(base or name or 'model')).name}", "results": results}]
    origin = f"`{name}`" + (f" (Hub: `{base}`)" if base and base != name else "")
    if base is None:
        origin += " (a project alias, not a Hugging Face Hub model)"
    facts = [
        f"Base model: {origin}",
        (f"Rounds done: {done} (configured: {cfg_get(config, 'rounds', 'unknown')}); "
         f"contributors per round: {cfg_get(config, 'contributors_per_round', 'unknown')}"),
        *pool_lines(roles, regression, missing or []),
        f"Contributor recipe (whole model, body and head): {recipe_text(cfg_get(config, 'client'))}",
        *(f"Evaluation {line}" for line in eval_text(cfg_get(config, "eval"))),
        *backtrack_lines(config, records),
    ]
    scores = (md_table(["view", "datasets", "start (round 0)", "final", "final round", "change (points)"], score_rows)
              if score_rows else "No evaluation was recorded for this run.")
    body = f"""# ColD Fusion fused model

The shared body produced by ColD Fusion (Don-Yehiya et al., ACL 2023), run as a Flower federation: each round,
contributors finetuned the current body on their own dataset and the server averaged their bodies into this
one. It has **no task heads**: put a fresh head (or a linear probe) on it for your task.

{chr(10).join(f"- {f}" for f in facts)}

## Measured scores

Mean accuracy over the classification datasets of each group (percent; regression datasets are left out).
"Linear probe, first token (ColD-Frozen)": frozen body, fresh linear head on the first token (the paper's view).
"Linear probe, mean pooling": the same on the mean of the tokens. "Full finetune (ColD)": fresh head, whole
model finetuned. "Final" is the saved model: the latest round that scored this very body.

{scores}

These scores come from this run's own train/test splits and its own sampling of contributors; they are not
numbers from the paper.

## How to load

```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{Path(model_dir)}")
tokenizer = AutoTokenizer.from_pretrained("{Path(model_dir)}")
```
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


# ------------------------------------------------------------------------------------------- plotting


def _figure(width: float, height: float):
    """A pyplot-free Figure: no global state, nothing to close, renders with Agg whatever backend is active."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_views_vs_rounds(records, roles, regression, baselines: Mapping[str, Sequence[Mapping[str, Any]]],
                         path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    views = [v for v in VIEWS if evaluated(records, v)]
    if not views:
        return None
    fig = _figure(5.5 * len(views), 4.2)
    axes = fig.subplots(1, len(views), squeeze=False, sharey=True)[0]
    for ax, view in zip(axes, views):
        for role, word in ROLES.items():
            series = mean_series(records, view, role, roles, regression)
            if series:
                ax.plot([n for n, _ in series], [100 * v for _, v in series], marker="o" if role == "contributing"
                        else "s", color=ROLE_COLORS[role], label=f"ColD Fusion, {word}")
        for name, recs in baselines.items():
            for role, value in baseline_means(recs, view, roles, regression).items():
                ax.axhline(100 * value, ls="--", lw=1, color=ROLE_COLORS[role], label=f"{name}, {ROLES[role]}")
                ax.annotate(name, (1, 100 * value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                            fontsize=8, color=ROLE_COLORS[role])
        ax.set(title=VIEWS[view], xlabel="round", ylabel="mean accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_seen_unseen(records, roles, regression, path: Path) -> Path | None:
    views = [v for v in VIEWS if evaluated(records, v)]
    if not views:
        return None
    fig = _figure(5 * len(views), 4)
    axes = fig.subplots(1, len(views), squeeze=False, sharey=True)[0]
    width = 0.26
    for ax, view in zip(axes, views):
        summaries = {role: summarise_series(records, view, role, roles, regression) for role in ROLES}
        for i, (point, color) in enumerate((("start", "0.6"), ("final", "tab:green"), ("best", "tab:purple"))):
            label: str | None = point  # one legend entry per kind of bar
            for x, role in enumerate(ROLES):
                p = summaries[role][point]
                if p is not None:
                    bar = ax.bar(x + (i - 1) * width, 100 * p[1], width, color=color, label=label)
                    ax.bar_label(bar, [f"{100 * p[1]:.1f}\nr{p[0]}"], fontsize=7)
                    label = None
        ax.set_xticks(range(len(ROLES)), [f"{w} ({r})" for r, w in ROLES.items()])
        ax.set(title=VIEWS[view], ylabel="mean accuracy (%)")
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def plot_task_gain(records, roles, regression, path: Path) -> Path | None:
    from matplotlib.patches import Patch

    panels = {}
    for view in VIEWS:
        rows = [r for r in task_rows(records, view, roles, regression) if r.gain is not None]
        if rows and final_round(records, view) not in (None, 0):
            panels[view] = sorted(rows, key=lambda r: r.gain)
    if not panels:
        return None
    tallest = max(len(rows) for rows in panels.values())
    fig = _figure(5.5 * len(panels), max(3.0, 0.3 * tallest + 1.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (view, rows) in zip(axes, panels.items()):
        labels = [r.task + (" (r)" if r.task in regression else "") for r in rows]
        ax.barh(labels, [100 * r.gain for r in rows], color=[ROLE_COLORS.get(r.role, "0.5") for r in rows])
        ax.axvline(0, color="black", lw=0.8)
        note = "; (r): Pearson r x 100" if any(r.task in regression for r in rows) else ""
        ax.set(title=f"{VIEWS[view]}: round {final_round(records, view)} vs round 0", xlabel=f"gain (points{note})")
        present = dict.fromkeys(r.role for r in rows)
        ax.legend(handles=[Patch(color=ROLE_COLORS.get(r, "0.5"), label=ROLES.get(r, r)) for r in present], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- files


def write_report(run_dir: str | Path, baselines: Mapping[str, str | Path] | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write metrics.csv, three plots and report.md into ``<run_dir>/report`` (or out_dir); return report.md."""
    run = load_run(run_dir)
    others: dict[str, Run] = {}
    for name, directory in (baselines or {}).items():
        try:
            others[name] = load_run(directory)
        except ReportError as exc:
            raise ReportError(f"baseline {name!r}: {exc}") from None
    out = Path(out_dir).expanduser() if out_dir is not None else run.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    roles, regression = task_roles(run.records, run.config), regression_tasks(run.records)
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["round", "view", "task", "role", "metric", "value"])
        writer.writerows(long_rows(run.records, roles))
    base_records = {name: b.records for name, b in others.items()}
    plots = []
    for name, plot in (("views_vs_rounds.png", partial(plot_views_vs_rounds, baselines=base_records)),
                       ("seen_unseen.png", plot_seen_unseen), ("task_gain.png", plot_task_gain)):
        if plot(run.records, roles, regression, path=out / name) is not None:
            plots.append(name)
        else:  # nothing to plot (e.g. no view ran at round 0 and later): drop a stale figure of an earlier report
            (out / name).unlink(missing_ok=True)
    report = out / "report.md"
    report.write_text(report_markdown(run, others, plots), encoding="utf-8")
    return report


def write_model_card(model_dir: str | Path, config: Mapping[str, Any], records: list[dict],
                     missing: list | None = None) -> Path:
    """Write ``<model_dir>/README.md`` (Hub metadata + what the model is and what this run measured)."""
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    path = Path(model_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(model_dir, config, records, missing), encoding="utf-8")
    return path


def parse_baselines(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=RUN_DIR`` pairs; a malformed or repeated one is a ReportError naming the argument."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise ReportError(f"--baseline {spec!r}: expected NAME=RUN_DIR (e.g. --baseline fused=outputs/run-1)")
        if name in out:
            raise ReportError(f"--baseline {spec!r}: the name {name!r} is given twice")
        out[name] = Path(directory)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="coldfusion-report",
        description="Write a run's report (CSV, plots, markdown) and its model card (when model/ exists).")
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl, config.yaml, model/)")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="another run evaluated on the same pool, shown as a baseline (repeatable)")
    parser.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    parser.add_argument("--model-card", action=argparse.BooleanOptionalAction, default=True,
                        help="also write RUN_DIR/model/README.md when RUN_DIR/model exists (default: yes)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir, parse_baselines(args.baseline), args.out)
        run = load_run(args.run_dir)
        card = (write_model_card(run.dir / "model", run.config, run.records, run.missing)
                if args.model_card and (run.dir / "model").is_dir() else None)
    except ReportError as exc:
        print(f"coldfusion-report: error: {exc}", file=sys.stderr)
        return 2
    print(render_table(run.records))
    for name in ("metrics.csv", "views_vs_rounds.png", "seen_unseen.png", "task_gain.png", "report.md"):
        if (report.parent / name).exists():
            print(report.parent / name)
    if card is not None:
        print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
