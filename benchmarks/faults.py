"""Reliability figures: faults injected vs survived, bad updates injected vs rejected, a malicious
contributor next to a clean run, and rounds lost to a crash (kill + resume).

    .venv/bin/python benchmarks/faults.py                         # everything
    .venv/bin/python benchmarks/faults.py --matrix-only --faults malformed   # one row of the fault matrix

Every run is a real `flwr run` simulation through the launcher. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.run.checkpoint import load_latest_checkpoint
from app.run.launch import run_simulation
from app.run.outputs import read_metrics
from tasks.synthetic import default_heldout, synthetic_task_infos

OUT = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / f"faults-{time.strftime('%Y%m%d-%H%M%S')}"
BAD_UPDATES = ("non_finite", "wrong_shape", "drop_key", "scale")
FAULTS = ("raise", "hang", *BAD_UPDATES, "malformed")  # malformed: a missing record, the wrong kind, wrong types


def fault_matrix(faults: tuple[str, ...] = FAULTS) -> list[str]:
    """16 tasks, every contributing node trains every round; up to 7 of the 13 contributors misbehave."""
    names = [i.name for i in synthetic_task_infos(0, 16) if i.name not in default_heldout(0, 16, 3)]
    faulty = dict(zip(names, faults))
    spec = "{" + ",".join(f"{t}:{f}" for t, f in faulty.items()) + "}"
    settings = ["experiment=tiny_sweep", "tasks.num_tasks=16", "tasks.num_heldout=3", "rounds=3",
                f"contributors_per_round={len(names)}", "faults.enabled=true", f"faults.tasks={spec}",
                "faults.hang_s=40", "federation.train_timeout_s=25"]
    status, run_dir = run_simulation(settings, output_root=OUT / "matrix")
    records = read_metrics(run_dir)[1:]
    rows = []
    for task, fault in faulty.items():
        injected = sum(task in r["contributors"] for r in records)
        caught = sum(any(line.startswith(task) for line in r["failures"] + r["rejections"]) for r in records)
        rows.append(f"| {fault} | {injected} | {caught} | {sum(r['fused'] for r in records)} of {len(records)} |")
    print(f"fault matrix run: {status}, {run_dir}")
    return rows


def malicious_vs_clean() -> list[str]:
    contributing = [i.name for i in synthetic_task_infos(0, 35) if i.name not in default_heldout(0, 35, 7)]
    rows = []
    for label, extra in [("clean", []),
                         ("1 malicious of 8 (100x update), validation on",
                          ["faults.enabled=true", f"faults.tasks={{{contributing[0]}:scale}}"]),
                         ("1 malicious of 8 (100x update), validation off",
                          ["faults.enabled=true", f"faults.tasks={{{contributing[0]}:scale}}",
                           "validation.max_relative_norm=null"])]:
        status, run_dir = run_simulation(extra, output_root=OUT / "malicious")
        records = read_metrics(run_dir)
        sampled = sum(contributing[0] in r["contributors"] for r in records)
        rejected = sum(len(r["rejections"]) for r in records)
        rows.append(f"| {label} | {status} | {100 * records[-1]['probe_heldout']:.1f} | "
                    f"{100 * records[-1]['probe_contributing']:.1f} | {sampled} | {rejected} |")
    return rows


def rounds_lost_to_a_crash() -> str:
    settings = ["experiment=tiny_sweep", "rounds=4", "client.head_policy=reinit"]
    out = OUT / "crash"
    launcher = subprocess.Popen([sys.executable, "-m", "app.run.launch", "--output-dir", str(out), *settings],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    while launcher.poll() is None and not list(out.glob("*-run*/ckpt-0002")):
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait()
    run_dir = next(out.glob("*-run*"))
    kept = load_latest_checkpoint(run_dir).round
    status, _ = run_simulation([*settings, f"resume={run_dir}"], output_root=out)
    rounds = [r["round"] for r in read_metrics(run_dir)]
    return (f"killed during round {kept + 1}: {kept} complete rounds kept, resumed run {status}, "
            f"metrics rounds {rounds}; rounds lost: the one in progress ({kept + 1})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), help="faults of the matrix")
    parser.add_argument("--matrix-only", action="store_true", help="skip the crash and malicious-contributor runs")
    args = parser.parse_args()
    matrix = fault_matrix(tuple(args.faults))
    print("\n| fault | times injected | times skipped or rejected | rounds fused |\n|---|---|---|---|")
    print("\n".join(matrix))
    if args.matrix_only:
        return 0
    print("\n" + rounds_lost_to_a_crash())
    table = malicious_vs_clean()
    print("\n| default run (35 clients, 10 rounds) | status | held-out probe | contributing probe "
          "| malicious sampled | rejections |\n|---|---|---|---|---|---|")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
