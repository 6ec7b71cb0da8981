"""Robust fusion under attacks that pass the norm rule: one or two malicious contributors pinned into every round's
sample (``faults.pinned``), sending a sign-flipped update (honest norm), an update scaled 4x, or Gaussian noise at
the honest norm (two colluders send the same direction). For each attack, a ``coldfusion-sweep`` over the fusion
operators and seeds; the held-out probe of the saved model next to the clean run's.

    .venv/bin/python benchmarks/fusion_attacks.py --out benchmarks/results/fusion          # every attack, 2 seeds
    .venv/bin/python benchmarks/fusion_attacks.py --out DIR --attacks noise --attackers 2 --seeds 0
    .venv/bin/python benchmarks/fusion_attacks.py --out DIR --summarise-only ROOT           # re-read a finished root

The clean run is the same sweep without faults. Pinning changes the sample by itself (the pinned tasks train in
every round, each other task in fewer), so each attack also has its honest control: the same tasks pinned, no
fault (``pinned xN``); an attack's effect is its row against that one. The attackers are the first contributing
tasks of the default synthetic pool. Everything runs with the probe at the first and last round only
(``eval.probe.every=first_last``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.run.outputs import read_round_records
from fusion import REPO, completed_jobs, mean_std, run_sweep  # benchmarks/fusion.py, next to this script
from strategies.records import saved_model_record
from tasks.synthetic import default_heldout, synthetic_task_infos

ATTACKS = {"sign_flip": [], "scale": ["faults.scale=4"], "noise": []}  # attack -> its extra overrides
OPERATORS = ("uniform_mean", "median", "trimmed_mean", "ties")
SERIES = {"probe": "first token", "probe_mean_pool": "mean pool"}


def attackers(count: int) -> list[str]:
    heldout = set(default_heldout(0, 35, 7))
    return [i.name for i in synthetic_task_infos(0, 35) if i.name not in heldout][:count]


def pinned_overrides(count: int) -> list[str]:
    """The honest control: the attackers' tasks pinned into every round, no fault."""
    return ["faults.enabled=true", f"faults.pinned=[{','.join(attackers(count))}]"]


def attack_overrides(attack: str, count: int) -> list[str]:
    names = attackers(count)
    tasks = "{" + ",".join(f"{n}:{'scale' if attack == 'scale' else attack}" for n in names) + "}"
    return ["faults.enabled=true", f"faults.pinned=[{','.join(names)}]", f"faults.tasks={tasks}", *ATTACKS[attack]]


def final_heldout(sweep_dir: Path) -> dict[str, dict[str, list[float]]]:
    """operator -> series -> the saved model's held-out probe mean, one per completed seed (in points)."""
    out: dict[str, dict[str, list[float]]] = {}
    for operator, job in completed_jobs([sweep_dir]):
        records = read_round_records(Path(job["run_dir"]))
        for series in SERIES:
            saved = saved_model_record(records, series)
            if saved is not None and saved.series_mean(series, "heldout") is not None:
                out.setdefault(operator, {}).setdefault(series, []).append(100 * saved.series_mean(series, "heldout"))
    return out


def target_lines(results: dict, operators: list[str], tolerance: float = 1.0) -> list[str]:
    """The issue's target, per attack and series: the operators whose held-out mean under attack (seed means) is
    within ``tolerance`` points of the clean run's (the default operator's, ``uniform_mean``) or above it; and each
    operator's change against its own honest control (the same tasks pinned, no fault), where that ran."""
    def seed_mean(setting: str, operator: str, series: str) -> float | None:
        stats = mean_std(results.get(setting, {}).get(operator, {}).get(series, []))
        return None if stats is None else stats[0]

    lines = []
    for series, label in SERIES.items():
        clean = seed_mean("clean", "uniform_mean", series)
        if clean is None:
            continue
        lines += [f"Held-out {label}: operators within {tolerance:g} point of the clean `uniform_mean` ({clean:.1f}); "
                  "in brackets, each operator against its honest control (pinned, no fault)", ""]
        for setting in results:
            if setting == "clean" or setting.startswith("pinned"):
                continue
            control = f"pinned {setting.split()[-1]}"
            scores = {o: seed_mean(setting, o, series) for o in operators}
            if all(v is None for v in scores.values()):
                lines.append(f"- {setting}: n/a (no completed run)")
                continue
            ok = [f"`{o}`" for o, v in scores.items() if v is not None and v >= clean - tolerance]
            versus = [f"`{o}` {v - c:+.1f}" for o, v in scores.items()
                      if v is not None and (c := seed_mean(control, o, series)) is not None]
            lines.append(f"- {setting}: {', '.join(ok) if ok else '**none**'}"
                         + (f" (against the control: {', '.join(versus)})" if versus else ""))
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--attackers", default="1,2", help="how many malicious contributors: comma-separated counts")
    parser.add_argument("--operators", default=",".join(OPERATORS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--summarise-only", type=Path, default=None, help="a finished root directory to re-read")
    args = parser.parse_args(argv)
    root = args.summarise_only or REPO / "outputs" / "benchmarks" / f"fusion-attacks-{time.strftime('%Y%m%d-%H%M%S')}"
    operators, seeds = args.operators.split(","), [int(s) for s in args.seeds.split(",")]
    counts = args.attackers.split(",")
    settings = ([("clean", [])] + [(f"pinned x{n}", pinned_overrides(int(n))) for n in counts]
                + [(f"{a} x{n}", attack_overrides(a, int(n))) for a in args.attacks.split(",") for n in counts])
    results = {}
    for name, overrides in settings:
        sweep_dir = root / name.replace(" ", "-")
        if args.summarise_only is None:
            run_sweep(sweep_dir, operators, seeds, overrides)
        results[name] = final_heldout(sweep_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attacks.json").write_text(json.dumps(results, indent=1))
    lines = [f"Held-out probe of the saved model (points), mean ± std over seeds {args.seeds}; attackers: "
             f"{', '.join(attackers(max(int(n) for n in args.attackers.split(','))))} (pinned into every round).", ""]
    for series, label in SERIES.items():
        lines += [f"### {label}", "", "| setting | " + " | ".join(f"`{o}`" for o in operators) + " |",
                  "|---|" + "---|" * len(operators)]
        for name in results:
            cells = []
            for operator in operators:
                stats = mean_std(results[name].get(operator, {}).get(series, []))
                cells.append("n/a" if stats is None else f"{stats[0]:.1f} ± {stats[1]:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += target_lines(results, operators)
    (args.out / "attacks.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
