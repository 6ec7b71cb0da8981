"""The real-data benchmark: ColD Fusion with MiniLM on ../shared/data, its two baselines, one report.

    .venv/bin/python benchmarks/realdata.py [--no-baselines] [--cold RUN_DIR] [--results DIR] [hydra overrides...]

1. ColD Fusion: ``coldfusion-sim experiment=realdata`` (both views at round 0 = the start model).
2. "Fused" (one-shot): the same with ``rounds=1 contributors_per_round=all``: every contributing dataset
   finetunes once from the start model, the bodies are averaged once.
3. Centralised multitask: ``coldfusion-multitask`` (one process, a head per dataset, the ColD Fusion
   run's total step budget), then ``rounds=0`` evaluates its body with the same harness and splits.

``--cold RUN_DIR`` reuses a finished ColD Fusion run (its ``metrics.jsonl`` and ``config.yaml``) instead of
step 1: the run is deterministic, so only the baselines need re-running; the report and ``run.md`` say so.
Pass the overrides that run was made with (its ``run.md``), so the baselines see the same pool and budgets.

All three are evaluated on the same pool, splits and views. The report (``app.report``: per-task and
per-round tables, plots, verdicts) and ``run.md`` (commands, wall times) go to ``--results``
(default ``benchmarks/results/realdata``); the runs themselves stay under ``outputs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.run.launch import run_simulation  # noqa: E402
from app.run.multitask import main as multitask_main  # noqa: E402
from app.report import write_report  # noqa: E402

EXPERIMENT = "realdata"


def timed(label: str, log: list[str], command: str, fn):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    log.append(f"| {label} | `{command}` | {seconds / 60:.1f} min |")
    print(f"{label}: {seconds:.0f} s")
    return result


def simulate(overrides: list[str], out_root: Path) -> Path:
    status, run_dir = run_simulation(overrides, EXPERIMENT, out_root)
    if status != "finished:completed" or run_dir is None:
        raise SystemExit(f"simulation {overrides} ended with status {status!r}")
    return run_dir


def reused_run(run_dir: Path, log: list[str]) -> Path:
    """A finished ColD Fusion run to reuse (``--cold``): checked now, so a wrong path fails before the baselines."""
    run_dir = run_dir.expanduser().resolve()
    missing = [name for name in ("metrics.jsonl", "config.yaml") if not (run_dir / name).is_file()]
    if missing:
        print(f"error: --cold {run_dir}: no {', '.join(missing)} there (a ColD Fusion run directory has both)",
              file=sys.stderr)
        raise SystemExit(2)
    log.append(f"| ColD Fusion | reused, not re-run: `{run_dir}` (see its own run.md) | - |")
    print(f"ColD Fusion: reusing {run_dir}")
    return run_dir


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so each simulation's SuperLink and Ray workers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-baselines", action="store_true", help="run ColD Fusion only")
    parser.add_argument("--baselines", default="fused,multitask",
                        help="which baselines to run, comma-separated (default: fused,multitask)")
    parser.add_argument("--cold", type=Path, default=None, metavar="RUN_DIR",
                        help="reuse this finished ColD Fusion run directory rather than re-running it")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / EXPERIMENT)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out_root = REPO / "outputs" / "benchmarks" / f"{EXPERIMENT}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = " ".join(args.overrides)
    log = ["| step | command | wall time |", "|---|---|---|"]
    if args.cold is not None:
        cold = reused_run(args.cold, log)
    else:
        cold = timed("ColD Fusion", log, f"coldfusion-sim experiment={EXPERIMENT} {extra}".strip(),
                     lambda: simulate(args.overrides, out_root))
    baselines = {}
    args.results.mkdir(parents=True, exist_ok=True)
    write_report(cold, out_dir=args.results)  # a first report, in case a baseline fails
    chosen = set() if args.no_baselines else set(args.baselines.split(","))
    if chosen - {"fused", "multitask"}:
        parser.error(f"--baselines: unknown {sorted(chosen - {'fused', 'multitask'})} (fused, multitask)")
    if "fused" in chosen:
        # its round 0 (the start model) is the ColD Fusion run's round 0: not scored twice
        fused_overrides = [*args.overrides, "rounds=1", "contributors_per_round=all", "eval.start=false"]
        baselines["fused"] = timed("Fused (one-shot)", log, f"coldfusion-sim experiment={EXPERIMENT} "
                                   f"{' '.join(fused_overrides)}", lambda: simulate(fused_overrides, out_root))
    if "multitask" in chosen:
        body = out_root / "multitask-body"
        train = [f"--out={body}", f"experiment={EXPERIMENT}", *args.overrides]
        if timed("multitask: training", log, f"coldfusion-multitask {' '.join(train)}",
                 lambda: multitask_main(train)) != 0:
            raise SystemExit("multitask training failed")
        evaluate = [*args.overrides, "rounds=0", f"model.name_or_path={body}"]
        baselines["multitask"] = timed("multitask: evaluation", log, f"coldfusion-sim experiment={EXPERIMENT} "
                                       f"{' '.join(evaluate)}", lambda: simulate(evaluate, out_root))
    report = write_report(cold, baselines=baselines, out_dir=args.results)
    if args.cold is not None:  # the report names where its ColD Fusion figures come from
        report.write_text(report.read_text(encoding="utf-8") + f"\nThe ColD Fusion run is reused from `{cold}` "
                          "(`benchmarks/realdata.py --cold`), not re-run; the baselines were run for this report.\n",
                          encoding="utf-8")
    shutil.copy(cold / "config.yaml", args.results / "config.yaml")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    command = " ".join([".venv/bin/python", "benchmarks/realdata.py", *sys.argv[1:]])  # flags included
    (args.results / "run.md").write_text(
        f"# How this report was made\n\n`{command}`\n\n"
        f"at commit {commit}, on {time.strftime('%Y-%m-%d')}, 2 CPU cores, no GPU."
        + (f" The ColD Fusion run was not re-run: it is reused from `{cold}` (`--cold`)." if args.cold else "")
        + " Steps:\n\n" + "\n".join(log) + "\n")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
