"""How fast the synthetic task generator is (a wall-clock figure, so it lives here and not in tests/).

    .venv/bin/python benchmarks/synthetic_speed.py              # the default: syn28_sent_relation, 1000 + 500 rows
    .venv/bin/python benchmarks/synthetic_speed.py --all        # every one of the 35 tasks

Each task is generated once to warm imports and caches, then ``--repeats`` times; prints the median and the
fastest wall-clock time per task and the rows per second, as a markdown table. The timing depends on the
machine and on its load: compare figures taken on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tasks.synthetic import load_synthetic, synthetic_task_infos


def time_task(name: str, train_size: int, test_size: int, repeats: int, seed: int = 2) -> list[float]:
    load_synthetic(name, seed=seed, train_size=10, test_size=10)  # warm imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_synthetic(name, seed=seed, train_size=train_size, test_size=test_size)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="syn28_sent_relation")
    parser.add_argument("--all", action="store_true", help="time every synthetic task")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = [i.name for i in synthetic_task_infos()] if args.all else [args.task]
    rows = args.train_size + args.test_size
    print("| task | rows | median s | fastest s | rows/s (median) |\n|---|---:|---:|---:|---:|")
    for name in names:
        times = time_task(name, args.train_size, args.test_size, args.repeats)
        median = statistics.median(times)
        print(f"| {name} | {rows} | {median:.3f} | {min(times):.3f} | {rows / median:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
