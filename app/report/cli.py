"""Writing a run's report files (``write_report``) and the ``coldfusion-report`` command line (``main``)."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from app.report.aggregate import long_rows, regression_tasks, task_roles
from app.report.markdown import report_markdown
from app.report.model_card import write_model_card
from app.report.plots import plot_seen_unseen, plot_task_gain, plot_views_vs_rounds
from app.report.runs import ReportError, Run, load_run
from app.report.table import render_table

REPORT_FILES = ("metrics.csv", "views_vs_rounds.png", "seen_unseen.png", "task_gain.png", "report.md")


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
    roles, regression = task_roles(run.records), regression_tasks(run.records)
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
    """``coldfusion-report RUN_DIR [--baseline NAME=RUN_DIR]... [--out DIR] [--no-model-card]``; 2 on a bad input."""
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
    for name in REPORT_FILES:
        if (report.parent / name).exists():
            print(report.parent / name)
    if card is not None:
        print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
