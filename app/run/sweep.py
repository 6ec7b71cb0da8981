"""``coldfusion-sweep``: Hydra multirun over real Flower simulations, with one summary at the end.

    coldfusion-sweep -m contributors_per_round=2,8 seed=0,1,2
    coldfusion-sweep -m experiment=quick client.head_policy=keep,reinit

Hydra expands the sweep; each job runs ``coldfusion-sim``'s path (a private SuperLink, ``flwr run``,
the run's final status checked with ``flwr ls``) one after another, and keeps the run's outputs in the
job's own Hydra directory (``multirun/<date>/<time>/<job>/``). When the sweep ends, ``summary.csv``,
``summary.md`` and ``summary.png`` in the sweep directory hold one row per job (its overrides, the saved
model's seen and unseen probe scores (first token, the paper's view), the best round (chosen on the unseen
tasks' dev rows, never on test) with its unseen test score, wall time, status and, for a failed job, the
reason), plus the mean and standard deviation over seeds for settings that repeat.
Every job's configuration is composed before the first job starts, so a bad key or value in any job
stops the sweep at once (exit 2, naming the job and the key). The exit status is 0 only if every job
completed.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import app.run.schema  # noqa: F401 - registers the schema that conf/config.yaml lists first
from app.run.config import CONF_DIR, ConfigError, compose_config
from app.run.outputs import read_round_records
from app.report import evaluated, saved_model_record
from strategies.records import RoundRecord

JOB_FILE = "job.json"
_last_sweep: dict[str, Any] = {}


def run_job(overrides: list[str], job_dir: Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    """One sweep job: a real simulation with these overrides (``cfg``: Hydra's composition of them); never
    raises, records what happened."""
    from app.run.launch import run_simulation

    started = time.perf_counter()
    job: dict[str, Any] = {"overrides": " ".join(overrides), "status": "failed", "reason": "",
                           "seen": None, "unseen": None, "best_dev_round": None, "best_dev_round_unseen": None}
    try:
        status, run_dir = run_simulation(overrides, output_root=job_dir, cfg=cfg)
        job["status"] = "completed" if status == "finished:completed" else "failed"
        if job["status"] == "failed":
            job["reason"] = f"run status {status}"
        if run_dir is not None and (run_dir / "metrics.jsonl").exists():
            job.update(run_dir=str(run_dir), **final_scores(read_round_records(run_dir)))
    except Exception as exc:  # noqa: BLE001 - a failed job is a row in the summary, not a crash
        job["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        (job_dir / "error.txt").write_text(traceback.format_exc())
    job["seconds"] = round(time.perf_counter() - started, 1)
    (job_dir / JOB_FILE).write_text(json.dumps(job, indent=1))
    return job


def final_scores(records: list[RoundRecord]) -> dict[str, Any]:
    """A job's row: the saved model's probe and finetune means (None where no round scored the saved model,
    e.g. a last round rolled back before the finetune view ever scored its base), and its best probe round:
    chosen on the unseen tasks' mean on dev rows (a decision never reads test), with that round's test mean."""
    row: dict[str, Any] = {}
    for series, prefix in (("probe", ""), ("finetune", "finetune_")):
        saved = saved_model_record(records, series)
        for role, word in (("contributing", "seen"), ("heldout", "unseen")):
            row[prefix + word] = saved.series_mean(series, role) if saved else None
    scored = [r for r in evaluated(records, "probe")
              if r.dev_mean("probe", "heldout") is not None and r.probe_heldout is not None]
    if scored:
        best = max(scored, key=lambda r: r.dev_mean("probe", "heldout"))
        row.update(best_dev_round=best.round, best_dev_round_unseen=best.probe_heldout)
    return row


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Collect every job of a sweep into summary.csv / summary.md / summary.png; return the rows."""
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"), key=lambda p: int(p.parent.name)
                       if p.parent.name.isdigit() else 0):
        rows.append({"job": path.parent.name, **json.loads(path.read_text())})
    columns = ["job", "overrides", "status", "seen", "unseen", "best_dev_round", "best_dev_round_unseen", "finetune_seen",
               "finetune_unseen", "seconds", "reason"]
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    groups = seed_groups(rows)
    (sweep_dir / "summary.md").write_text(markdown_summary(rows, columns, groups))
    if rows:
        plot_summary(rows, sweep_dir / "summary.png")
    return rows


def seed_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Completed jobs grouped by their overrides without ``seed=``: repeats of one setting."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "completed":
            setting = " ".join(o for o in row["overrides"].split() if not o.startswith("seed=")) or "(defaults)"
            groups.setdefault(setting, []).append(row)
    return {k: v for k, v in groups.items() if len(v) > 1}


def markdown_summary(rows, columns, groups) -> str:
    def cell(row, column):
        value = row.get(column)
        if value is None:
            return ""
        if column in ("seen", "unseen", "best_dev_round_unseen", "finetune_seen", "finetune_unseen"):
            return f"{100 * value:.2f}"
        return str(value).replace("|", "\\|")

    lines = ["# Sweep summary", "", "Scores: accuracy (%) of the final base, mean over contributing (seen) and "
             "held-out (unseen) tasks: linear probe, and full finetuning (finetune_*) where that view ran. "
             "best_dev_round: the round with the best unseen probe mean on dev rows (carved from train, never test); "
             "best_dev_round_unseen: that round's unseen test mean.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    if groups:
        lines += ["", "## Over seeds", "", "| setting | jobs | seen mean ± std | unseen mean ± std |", "|---|---|---|---|"]
        for setting, members in groups.items():
            lines.append(f"| {setting} | {len(members)} | {_mean_std([m['seen'] for m in members])} | "
                         f"{_mean_std([m['unseen'] for m in members])} |")
    failed = [r for r in rows if r["status"] != "completed"]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} jobs completed."]
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float | None]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def plot_summary(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['job']}: {r['overrides'] or '(defaults)'}" + ("" if r["status"] == "completed" else " [failed]")
              for r in rows]
    seen = [100 * (r["seen"] or 0) for r in rows]
    unseen = [100 * (r["unseen"] or 0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], seen, height=0.4, label="seen (contributing)")
    ax.barh([i - 0.2 for i in y], unseen, height=0.4, label="unseen (held out)")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final linear-probe accuracy (%)")
    ax.set_title("ColD Fusion sweep")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback: write the sweep's summary once every job has run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        _last_sweep.update(dir=sweep_dir, rows=rows)
        print((sweep_dir / "summary.md").read_text())
        print(f"sweep summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.png'}")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_job(list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir), cfg)


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of every job of a sweep, expanded by Hydra's own sweeper (``hydra.*`` keys and flags left out)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith(("-", "hydra."))])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_jobs(args: list[str]) -> None:
    """Compose every job's configuration before the first one starts: a bad key or value in any job stops the
    sweep at once (ConfigError naming the job and the key), rather than after the jobs before it have run."""
    for overrides in sweep_jobs(args):
        try:
            compose_config("", overrides)
        except ConfigError as exc:
            raise ConfigError(f"sweep job [{' '.join(overrides)}]: {exc}") from None


def main() -> int:
    """Console entry point: check every job, run the Hydra app, then exit non-zero if any job failed."""
    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        sys.argv.insert(1, "--multirun")  # a sweep tool: a single setting is a sweep of one job
    try:
        check_jobs(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _job()
    rows = _last_sweep.get("rows", [])
    return 0 if rows and all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
