"""The report's three figures (views vs rounds, seen vs unseen, per-task gain), drawn with matplotlib into PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from app.report.aggregate import ROLES, VIEWS, baseline_means, evaluated, final_round, mean_series, \
    summarise_series, task_rows
from strategies.records import RoundRecord

ROLE_COLORS = {"contributing": "tab:blue", "heldout": "tab:orange"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BAR_LABELS = {"start": "start", "final": "final", "best": "best round on dev (its test score)"}


def _figure(width: float, height: float):
    """A pyplot-free Figure: no global state, nothing to close, renders with Agg whatever backend is active."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_views_vs_rounds(records: Sequence[RoundRecord], roles: Mapping[str, str], regression: set[str],
                         baselines: Mapping[str, Sequence[RoundRecord]], path: Path) -> Path | None:
    """Each view's seen and unseen mean per round, with each baseline's final means as dashed lines."""
    from matplotlib.ticker import MaxNLocator

    views = [v for v in VIEWS if evaluated(records, v)]
    if not views:
        return None
    fig = _figure(5.5 * len(views), 4.2)
    axes = fig.subplots(1, len(views), squeeze=False, sharey=True)[0]
    for ax, view in zip(axes, views):
        for role, word in ROLES.items():
            series = mean_series(records, view, role)
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


def plot_seen_unseen(records: Sequence[RoundRecord], roles: Mapping[str, str], regression: set[str],
                     path: Path) -> Path | None:
    """Start, final and best mean per role and view, as grouped bars labelled with their round (test scores; the
    best round is chosen on dev rows, never on test)."""
    views = [v for v in VIEWS if evaluated(records, v)]
    if not views:
        return None
    fig = _figure(5 * len(views), 4)
    axes = fig.subplots(1, len(views), squeeze=False, sharey=True)[0]
    width = 0.26
    for ax, view in zip(axes, views):
        summaries = {role: summarise_series(records, view, role) for role in ROLES}
        for i, (point, color) in enumerate((("start", "0.6"), ("final", "tab:green"), ("best", "tab:purple"))):
            label: str | None = BAR_LABELS[point]  # one legend entry per kind of bar
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


def plot_task_gain(records: Sequence[RoundRecord], roles: Mapping[str, str], regression: set[str],
                   path: Path) -> Path | None:
    """Each task's gain of the saved model over round 0, per view that scored both (None: nothing to draw)."""
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
