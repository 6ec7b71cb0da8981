"""Asynchronous vs synchronous ColD Fusion when a quarter of the contributors are stragglers.

    .venv/bin/python benchmarks/async_stragglers.py --out benchmarks/results/async                 # 3 seeds
    .venv/bin/python benchmarks/async_stragglers.py --out DIR --seeds 0                           # a quick look
    .venv/bin/python benchmarks/async_stragglers.py --summarise-only DIR/runs.json --out DIR      # redraw

The default synthetic run (35 virtual clients, the tiny model), with 7 of its 28 contributing tasks (every
fourth by name) made 5x slower by waiting (``faults.slow``, a testing aid; the simulation's nodes opt in):

* **sync**: 10 rounds of 8 contributors (80 contributions), the probe scored every round;
* **async**: ``mode=async``, 8 contributors training at all times, a version every 4 contributions, 20 versions
  (80 contributions fused), the probe scored every 2 versions (as often per contribution as sync).

Both runs let Ray hand out 10 CPUs (``simulation.ray_cpus=10``) on this 2-core machine, so stragglers, which
mostly wait, do not hold the clients that train. The clock of a run is the sum of its training phases
(``seconds_train`` of each record: evaluation time left out). In the async mode contributors keep training
while the server evaluates, so its clock also gets that training for free: the figure with evaluation
included is printed next to it (the conservative figure). The target: async reaches the held-out probe score
that sync has after its 10 rounds in at most 0.6x sync's clock. Where sync ends at or below its start score the
start model already holds that score and there is no time to compare: the row says so. A second table compares
the clock for the same contributor training (80 fused contributions) and the scores at its end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from app.run.launch import run_simulation
from app.run.outputs import read_metrics
from tasks.synthetic import default_heldout, synthetic_task_infos

REPO = Path(__file__).resolve().parents[1]
NAMES = [i.name for i in synthetic_task_infos(0, 35)]
CONTRIBUTING = sorted(n for n in NAMES if n not in default_heldout(0, 35, 7))
SLOW = CONTRIBUTING[::4]  # 7 of 28
COMMON = ["faults.enabled=true", "faults.slow={" + ",".join(f"{t}:5" for t in SLOW) + "}",
          "simulation.ray_cpus=10", "contributors_per_round=8"]
MODES = {
    "sync": ["rounds=10", "eval.probe.every=1"],
    "async": ["mode=async", "rounds=20", "asynchronous.concurrency=8", "asynchronous.buffer_size=4",
              "eval.probe.every=2"],
}


def curve(run_dir: Path) -> list[dict]:
    """Per evaluated record: the clock without evaluation, the clock with it, the held-out probe, the work sent."""
    out, train, total, sent = [], 0.0, 0.0, 0
    for r in read_metrics(run_dir):
        train += r["seconds_train"]
        total += r["seconds_train"] + r["seconds_eval"]
        sent = r.get("dispatched") or sent + len(r["contributors"])
        if r.get("probe_heldout") is not None:
            out.append({"round": r["round"], "clock": train, "clock_with_eval": total, "heldout": r["probe_heldout"],
                        "sent": sent})
    return out


def time_to(points: list[dict], score: float) -> dict | None:
    return next((p for p in points if p["heldout"] >= score - 1e-12), None)


def seed_mean(curves: list[list[dict]]) -> list[dict]:
    """The curves of several seeds averaged point by point (the n-th evaluation of each: the same round or
    version in every seed), clocks and scores alike."""
    return [{key: statistics.mean(p[key] for p in points) for key in points[0]} for points in zip(*curves)]


def summarise(runs: dict, out: Path) -> str:
    """Two tables: the clock to sync's 10-round held-out score (the issue's figure), and the clock for the same
    contributor training (80 fused contributions) with the scores there. A seed whose sync run ends at or below
    its start score has no time to the target (the start model already holds it): it is said, not counted."""
    rows_of = {**{seed: by_mode for seed, by_mode in sorted(runs.items())},
               **({"mean": {mode: seed_mean([r[mode] for r in runs.values()]) for mode in MODES}}
                  if len(runs) > 1 else {})}
    target_rows, work_rows, ratios, work_ratios = [], [], [], []
    for seed, by_mode in rows_of.items():
        sync, asyn = by_mode["sync"], by_mode["async"]
        start, target = sync[0]["heldout"], sync[-1]["heldout"]
        hit_sync, hit_async = time_to(sync, target), time_to(asyn, target)
        if target <= start:
            cells = "0 (sync ends at or below its start: the start model holds the target) | - | -"
        elif hit_async is None:
            cells = (f"{hit_sync['clock']:.0f} ({hit_sync['clock_with_eval']:.0f}) | not reached (best "
                     f"{100 * max(p['heldout'] for p in asyn):.1f}) | n/a")
        else:
            ratio = hit_async["clock"] / hit_sync["clock"]
            ratios += [ratio] if seed != "mean" else []
            cells = (f"{hit_sync['clock']:.0f} ({hit_sync['clock_with_eval']:.0f}) | {hit_async['clock']:.0f} "
                     f"({hit_async['clock_with_eval']:.0f}) at version {hit_async['round']:.0f}, "
                     f"{hit_async['sent']:.0f} jobs sent | {ratio:.2f} "
                     f"({hit_async['clock_with_eval'] / hit_sync['clock_with_eval']:.2f})")
        target_rows.append(f"| {seed} | {100 * start:.1f} | {100 * target:.1f} | {cells} |")
        work = asyn[-1]["clock"] / sync[-1]["clock"], asyn[-1]["clock_with_eval"] / sync[-1]["clock_with_eval"]
        work_ratios += [work] if seed != "mean" else []
        work_rows.append(f"| {seed} | {sync[-1]['clock']:.0f} ({sync[-1]['clock_with_eval']:.0f}) | "
                         f"{asyn[-1]['clock']:.0f} ({asyn[-1]['clock_with_eval']:.0f}), {asyn[-1]['sent']:.0f} jobs "
                         f"sent | {work[0]:.2f} ({work[1]:.2f}) | {100 * target:.1f} | {100 * asyn[-1]['heldout']:.1f} "
                         f"| {100 * max(p['heldout'] for p in sync):.1f} "
                         f"| {100 * max(p['heldout'] for p in asyn):.1f} |")
    lines = ["Clock to the held-out probe score sync has after 10 rounds (seconds of training phases; with evaluation "
             "in brackets):", "",
             "| seed | held-out probe at start | sync after 10 rounds (the target) | sync: seconds to it | "
             "async: seconds to it | async/sync |", "|---|---|---|---|---|---|", *target_rows, ""]
    lines.append(f"async/sync clock to the target, mean of {len(ratios)} per-seed ratio(s): "
                 f"{statistics.mean(ratios):.2f} (target <= 0.6)" if ratios else
                 "async/sync clock to the target: no seed has one (see the rows)")
    lines += ["", "The same contributor training (as many fused contributions: sync's rounds, async's versions; "
              "80 with the default settings):", "",
              "| seed | sync: seconds | async: seconds | async/sync | sync held-out probe at the end | async at the "
              "end | sync best | async best |", "|---|---|---|---|---|---|---|---|", *work_rows, "",
              f"async/sync clock for the same training, mean of {len(work_ratios)} seed(s): "
              f"{statistics.mean(w[0] for w in work_ratios):.2f} "
              f"({statistics.mean(w[1] for w in work_ratios):.2f} with evaluation)",
              "The 'mean' rows are the seed-mean curves' (the n-th evaluation averaged over seeds)."]
    _plot(runs, out / "async.png")
    return "\n".join(lines)


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, colour in (("sync", "tab:blue"), ("async", "tab:orange")):
        for i, (seed, by_mode) in enumerate(sorted(runs.items())):
            points = by_mode[mode]
            ax.plot([p["clock"] for p in points], [100 * p["heldout"] for p in points], color=colour, alpha=0.8,
                    marker="o", markersize=3, label=mode if i == 0 else None)
    ax.set_xlabel("seconds of training phases (evaluation left out)")
    ax.set_ylabel("held-out probe (first token), %")
    ax.set_title("7 of 28 contributors 5x slower: sync rounds vs async versions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--summarise-only", type=Path, default=None, help="a runs.json written earlier")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out / "runs.json"
    runs = json.loads((args.summarise_only or runs_file).read_text()) if (args.summarise_only or
                                                                           runs_file.exists()) else {}
    if args.summarise_only is None:
        for seed in args.seeds.split(","):
            for mode, settings in MODES.items():
                if mode in runs.get(seed, {}):
                    continue  # measured earlier: runs.json keeps every finished run
                command = [*COMMON, *settings, f"seed={seed}", *args.overrides]
                status, run_dir = run_simulation(command, output_root=REPO / "outputs" / "benchmarks" / "async")
                if status != "finished:completed" or run_dir is None:
                    print(f"seed {seed} {mode}: run failed ({status})")
                    return 1
                runs.setdefault(seed, {})[mode] = curve(run_dir)
                runs_file.write_text(json.dumps(runs, indent=1))
                print(f"seed {seed} {mode}: {run_dir} ({' '.join(command)})", flush=True)
    table = summarise(runs, args.out)
    (args.out / "async.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
