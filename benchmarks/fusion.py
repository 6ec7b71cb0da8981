"""Fusion operators (or any other setting) compared on the same runs: a ``coldfusion-sweep`` over the values and
seeds, then the probe gain of each value's saved model over the start model (held-out and contributing, both probe
poolings), mean and standard deviation over seeds, as a markdown table and a plot.

    .venv/bin/python benchmarks/fusion.py --out benchmarks/results/fusion              # every operator, 3 seeds
    .venv/bin/python benchmarks/fusion.py --out DIR --operators uniform_mean,ties --seeds 0 experiment=realdata
    .venv/bin/python benchmarks/fusion.py --out DIR --key transport.dtype --operators float32,float16,bfloat16
    .venv/bin/python benchmarks/fusion.py --out DIR --summarise-only SWEEP_DIR [...]   # re-read finished sweeps

Every operator runs with its documented default parameters (``conf/fusion/<name>.yaml``); the probe runs at the
first and the last round only (``eval.probe.every=first_last``), which is what the gain compares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from app.run.outputs import read_round_records
from strategies.fusion import OPERATORS
from strategies.records import saved_model_record

REPO = Path(__file__).resolve().parents[1]
SERIES = {"probe": "first token", "probe_mean_pool": "mean pool"}
ROLES = {"heldout": "held-out", "contributing": "contributing"}


def run_sweep(sweep_dir: Path, operators: list[str], seeds: list[int], overrides: list[str],
              key: str = "fusion") -> int:
    command = [str(Path(sys.executable).parent / "coldfusion-sweep"), "-m", f"{key}={','.join(operators)}",
               f"seed={','.join(map(str, seeds))}", "eval.probe.every=first_last", f"hydra.sweep.dir={sweep_dir}",
               *overrides]
    print("running:", " ".join(command[1:]), flush=True)
    return subprocess.run(command, cwd=REPO).returncode


def gains(run_dir: Path) -> dict[str, float | None]:
    """Saved model minus start model, in points, per series and role."""
    records = read_round_records(run_dir)
    start = records[0]
    out: dict[str, float | None] = {}
    for series in SERIES:
        final = saved_model_record(records, series)
        for role in ROLES:
            before = start.series_mean(series, role)
            after = final.series_mean(series, role) if final is not None else None
            out[f"{series}/{role}"] = None if before is None or after is None else 100 * (after - before)
    return out


def completed_jobs(sweep_dirs: list[Path], key: str = "fusion") -> Iterator[tuple[str, dict]]:
    """(the job's value of ``key``, job record) of every completed job of the sweeps; the others are listed."""
    for job_file in sorted(f for sweep_dir in sweep_dirs for f in sweep_dir.glob("*/job.json")):
        job = json.loads(job_file.read_text())
        if job["status"] == "completed" and job.get("run_dir"):
            yield next(o.split("=", 1)[1] for o in job["overrides"].split() if o.startswith(f"{key}=")), job
        else:
            print(f"job {job_file.parent} ({job['overrides']}) did not complete: {job.get('reason')}")


def collect(sweep_dirs: list[Path], key: str = "fusion") -> dict[str, list[dict[str, float | None]]]:
    """value (operator) -> one gains dict per completed job (seed), over one or more sweeps."""
    by_operator: dict[str, list[dict[str, float | None]]] = {}
    for operator, job in completed_jobs(sweep_dirs, key):
        by_operator.setdefault(operator, []).append({**gains(Path(job["run_dir"])), "seconds": job["seconds"]})
    return by_operator


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(by_operator: dict[str, list[dict[str, float | None]]], key: str = "fusion") -> str:
    columns = [f"{ROLES[r]} {SERIES[s]}" for s in SERIES for r in ROLES]
    lines = [f"| {'operator' if key == 'fusion' else key} | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    order = sorted(by_operator, key=lambda o: -(mean_std([g["probe/heldout"] for g in by_operator[o]]) or (0, 0))[0])
    for operator in order:
        cells = []
        for series in SERIES:
            for role in ROLES:
                stats = mean_std([g[f"{series}/{role}"] for g in by_operator[operator]])
                cells.append("n/a" if stats is None else f"{stats[0]:+.1f} ± {stats[1]:.1f}")
        lines.append(f"| `{operator}` | {len(by_operator[operator])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(by_operator: dict[str, list[dict[str, float | None]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    operators = sorted(by_operator)
    fig, axes = plt.subplots(1, len(SERIES), figsize=(11, 0.45 * len(operators) + 1.5), sharey=True)
    for ax, series in zip(axes, SERIES):
        for offset, role, color in ((0.2, "heldout", "tab:orange"), (-0.2, "contributing", "tab:blue")):
            stats = [mean_std([g[f"{series}/{role}"] for g in by_operator[o]]) or (0.0, 0.0) for o in operators]
            ax.barh([i + offset for i in range(len(operators))], [s[0] for s in stats], height=0.4,
                    xerr=[s[1] for s in stats], color=color, label=ROLES[role])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"probe gain over the start model, {SERIES[series]}")
        ax.set_xlabel("points (mean ± std over seeds)")
    axes[0].set_yticks(range(len(operators)), operators)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the table, plot and run notes go")
    parser.add_argument("--key", default="fusion", help="the setting compared (default: the fusion operator)")
    parser.add_argument("--operators", default=",".join(OPERATORS), help="comma-separated values of --key")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--summarise-only", type=Path, nargs="+", default=None,
                        help="finished sweep directories to re-read (their jobs are pooled)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. experiment=realdata")
    args = parser.parse_args(argv)
    sweep_dirs = args.summarise_only or [REPO / "outputs" / "benchmarks" / f"fusion-{time.strftime('%Y%m%d-%H%M%S')}"]
    if args.summarise_only is None:
        code = run_sweep(sweep_dirs[0], args.operators.split(","), [int(s) for s in args.seeds.split(",")],
                         args.overrides, args.key)
        print(f"sweep exit status {code} (non-zero: some job failed; listed below)")
    by_operator = collect(sweep_dirs, args.key)
    if not by_operator:
        print(f"no completed job in {', '.join(map(str, sweep_dirs))}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(by_operator, args.key)
    (args.out / "operators.md").write_text(
        "Probe gain (points) of the saved model over the start model, mean ± std over seeds; rows by held-out "
        f"first-token gain.\n\n{text}\n")
    plot(by_operator, args.out / "operators.png")
    (args.out / "gains.json").write_text(json.dumps(by_operator, indent=1))
    print(text)
    print(f"written: {args.out / 'operators.md'}, {args.out / 'operators.png'}, {args.out / 'gains.json'}; "
          f"sweeps: {', '.join(map(str, sweep_dirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
