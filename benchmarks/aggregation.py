"""The server's aggregation, side by side on the same K bodies: time and peak memory of a memcpy of the replies'
bytes, Flower's ``FedAvg.aggregate_train`` (unvalidated weighted mean), and this project's server path
(``ColdFusion``: each reply read, validated in one pass and folded into the fusion as it arrives).

Two memcpy figures: ``memcpy`` copies every reply's bytes into fresh memory (K copies held, as a server that kept
the replies would), so it pays a page fault per 4 KB page, which on a virtual machine can cost more than the copy;
``memcpy_warm`` copies them one reply at a time into one buffer touched beforehand: the machine's copy bandwidth,
the stricter peer.

    .venv/bin/python benchmarks/aggregation.py --out benchmarks/results/aggregation            # the issue's sizes
    .venv/bin/python benchmarks/aggregation.py --out DIR --cases minilm:8 --repeats 1           # a quick look
    PYTHONPATH=. .venv/bin/python benchmarks/aggregation.py --passes minilm    # each pass over one body, before/now
    PYTHONPATH=. .venv/bin/python benchmarks/aggregation.py --out DIR --cases minilm:35 --methods coldfusion \
        --fusion median --repeats 1          # the robust operators' peak (benchmarks/results/aggregation/robust/)

Each (case, method, repeat) runs in its own process, so one method's memory never flatters another's; the
figure is the median over repeats. Bodies are random float32 tensors in the layout of the named model (MiniLM-L6:
22.7M parameters; RoBERTa-base: 125M), each contribution the base plus small seeded noise, so every method sees
the same bytes. Peak memory is the process's resident set, sampled every 5 ms, above what it held when the
aggregation started, in bodies:

* Flower's path starts once every reply is in memory (``grid.send_and_receive`` returns them all at once);
* the streaming path starts before the first reply, and each reply is made only when the loop asks for it, as
  ``pull_messages`` would hand it over: what it holds is the base, the accumulator and the reply in hand.
  ``coldfusion`` takes the replies in the order they were pushed (the fold's order); ``coldfusion_reversed`` in
  the reverse, the worst case, where every reply but the last arrives ahead of its turn and waits on disk. The
  rounds are steady-state ones (the last fused round's norms are known, so the norm rule can judge each reply as
  it comes); in a run's first round the rule must wait for peers, and the first replies wait on disk.

The resident set also counts memory the C allocator has freed but kept for reuse (glibc serves blocks up to 32 MB
from its heap once larger ones have been freed), which is noise of tens of percent here. So each (case, method)
also runs once with ``MALLOC_MMAP_THRESHOLD_=131072``, where every large block is returned when freed: its peak
is the memory really live at once ("live peak"). Its time is not used (every allocation then faults its pages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

LAYOUTS = {  # (vocab, hidden, layers, ffn): BERT/RoBERTa encoder bodies
    "minilm": (30522, 384, 6, 1536),
    "roberta": (50265, 768, 12, 3072),
}
METHODS = ("memcpy", "memcpy_warm", "flower_fedavg", "coldfusion", "coldfusion_reversed")
PAGE = os.sysconf("SC_PAGE_SIZE")


def shapes(model: str) -> dict[str, tuple[int, ...]]:
    vocab, hidden, layers, ffn = LAYOUTS[model]
    out: dict[str, tuple[int, ...]] = {"embeddings.word": (vocab, hidden), "embeddings.position": (514, hidden),
                                       "embeddings.type": (2, hidden), "embeddings.ln.weight": (hidden,),
                                       "embeddings.ln.bias": (hidden,)}
    for i in range(layers):
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
            out[f"layer{i}.{name}.weight"] = shape
            out[f"layer{i}.{name}.bias"] = (shape[0],)
        for ln in ("ln1", "ln2"):
            out[f"layer{i}.{ln}.weight"] = (hidden,)
            out[f"layer{i}.{ln}.bias"] = (hidden,)
    return out


def base_body(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes(model).items()}


def contribution(base: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def reply(ask: Message, body: dict[str, torch.Tensor], node_id: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node_id, node_id
    metrics = MetricRecord({"train-loss": 0.5, "num-examples": 480, "server-round": 1, "head-kept": 1})
    return Message(content=RecordDict({"arrays": ArrayRecord(body), "metrics": metrics}), reply_to=ask)


class PeakRSS:
    """The resident set's peak above its level at ``start``, sampled every 5 ms by a thread."""

    def __enter__(self) -> "PeakRSS":
        self.start, self.peak, self._stop = self._rss(), 0, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE


def asks(node_ids: list[int], base: ArrayRecord) -> list[Message]:
    out = []
    for n in node_ids:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, n
        message = Message(content=RecordDict({"arrays": base, "config": ConfigRecord({})}),
                          message_type=MessageType.TRAIN, dst_node_id=n)
        message.metadata.__dict__["_message_id"] = f"m{n}"
        out.append(message)
    return out


def run_one(method: str, model: str, k: int, fusion: str = "uniform_mean") -> dict:
    base = base_body(model)
    body_bytes = sum(t.numel() * t.element_size() for t in base.values())
    node_ids = list(range(100, 100 + k))
    base_record = ArrayRecord(base)
    if method in ("memcpy", "memcpy_warm", "flower_fedavg"):
        replies = [reply(ask, contribution(base, i), n) for i, (ask, n) in enumerate(zip(asks(node_ids, base_record),
                                                                                          node_ids))]
        warm = np.ones(max(r.content["arrays"].count_bytes() for r in replies), np.uint8)  # touched: no page faults
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            if method == "memcpy":
                copies = [[bytearray(a.data) for a in r.content["arrays"].values()] for r in replies]
                del copies
            elif method == "memcpy_warm":
                for r in replies:
                    offset = 0
                    for a in r.content["arrays"].values():
                        warm[offset:offset + len(a.data)] = np.frombuffer(a.data, np.uint8)
                        offset += len(a.data)
            else:
                from flwr.serverapp.strategy import FedAvg

                FedAvg().aggregate_train(1, replies)
            seconds = time.perf_counter() - t0
    else:
        from strategies.coldfusion import ColdFusion
        from strategies.discovery import NodeTask
        from tasks.spec import TaskInfo

        strategy = ColdFusion(pool=[], contributors_per_round=k, max_relative_norm=5.0, fusion=fusion)
        strategy.nodes = {n: NodeTask(n, f"t{n}", "contributing", TaskInfo(f"t{n}", 2, False), "{}", label=f"t{n}")
                          for n in node_ids}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0  # messages made outside a runtime
        messages = list(strategy.configure_train(1, base_record, ConfigRecord(), grid=None))
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"  # as Flower's push sets it
        first = contribution(base, 0)
        honest = float(torch.sqrt(sum(((first[key] - v).double() ** 2).sum() for key, v in base.items())))
        del first
        # A steady-state round: the last fused round's K norms are known, so the norm rule can judge each reply as
        # it comes (with fewer known norms than outstanding replies it must wait for peers; see the docstring).
        strategy.reference_norms = [honest] * k
        seconds = 0.0
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            intake = strategy._open_intake(1)
            seconds += time.perf_counter() - t0
            if method == "coldfusion_reversed":  # the worst arrival order: all but the last wait on disk
                messages.reverse()
            for i, message in enumerate(messages):
                incoming = reply(message, contribution(base, i), message.metadata.dst_node_id)  # as pulled
                t0 = time.perf_counter()
                strategy._take_train_reply(incoming, intake, consume=True)
                del incoming
                seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            fused, _ = strategy._close_round(1, intake)
            seconds += time.perf_counter() - t0
        assert fused is not None and len(strategy._record.fused_contributors) == k, strategy._record.rejections
    return {"method": method, "model": model, "k": k, "fusion": fusion, "seconds": seconds,
            "peak_bytes": peak.peak - peak.start, "body_bytes": body_bytes}


def passes(model: str, repeats: int = 7) -> dict[str, float]:
    """Milliseconds (median) of each pass over one contribution, the way it was done before and the way it is now."""
    from strategies.chunks import chunks, squared_distance
    from strategies.transport import to_state_dict

    base = base_body(model)
    body = contribution(base, 1)
    record = ArrayRecord(body)
    sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}

    def whole_fold():
        for key, value in body.items():
            sums[key].add_(value)

    def chunked_fold():
        for key, value in body.items():
            for out, part in chunks(sums[key], value):
                out.add_(part)

    ways = {
        "decode, Flower's to_torch_state_dict": lambda: record.to_torch_state_dict(),
        "decode, shared bytes (to_state_dict)": lambda: to_state_dict(record),
        "update norm, whole tensors, float64 reduction": lambda: [
            torch.linalg.vector_norm(torch.sub(body[k], v), dtype=torch.float64) for k, v in base.items()],
        "update norm, chunks (squared_distance)": lambda: [squared_distance(body[k], v) for k, v in base.items()],
        "fold into float64 sums, whole tensors": whole_fold,
        "fold into float64 sums, chunks": chunked_fold,
    }
    out = {}
    for name, way in ways.items():
        way()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            way()
            times.append(time.perf_counter() - t0)
        out[name] = round(1e3 * statistics.median(times), 1)
    return out


def one(method: str, model: str, k: str, env: dict[str, str] | None = None, fusion: str = "uniform_mean") -> dict:
    """``run_one`` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--one", method, model, k, "--fusion", fusion],
                         capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {}), "PYTHONPATH": str(Path(__file__).parents[1])})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", default="minilm:8,minilm:35,roberta:8", help="model:K, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MODEL", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--passes", metavar="MODEL", help="time each pass over one contribution, before and now")
    parser.add_argument("--fusion", default="uniform_mean", help="the fusion operator of the coldfusion methods")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    args = parser.parse_args(argv)
    if args.passes:
        print(json.dumps(passes(args.passes), indent=1))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.fusion)))
        return 0
    rows = []
    for case in args.cases.split(","):
        model, k = case.split(":")
        for method in args.methods.split(","):
            runs = [one(method, model, k, fusion=args.fusion) for _ in range(args.repeats)]
            live = one(method, model, k, {"MALLOC_MMAP_THRESHOLD_": "131072"}, fusion=args.fusion)
            row = {"model": model, "k": int(k), "method": method, "fusion": args.fusion,
                   "seconds": statistics.median(r["seconds"] for r in runs),
                   "peak_bodies": statistics.median(r["peak_bytes"] / r["body_bytes"] for r in runs),
                   "live_peak_bodies": live["peak_bytes"] / live["body_bytes"],
                   "body_mb": runs[0]["body_bytes"] / 1e6}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| K, body | method | seconds (median) | GB/s of replies | peak above start, in bodies (RSS) "
             "| live peak, in bodies |", "|---|---|---|---|---|---|"]
    for row in rows:
        rate = row["k"] * row["body_mb"] / 1e3 / row["seconds"]
        lines.append(f"| {row['k']}, {row['model']} ({row['body_mb']:.0f} MB) | {row['method']} | {row['seconds']:.3f} "
                     f"| {rate:.2f} | {row['peak_bodies']:.1f} | {row['live_peak_bodies']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "aggregation.json").write_text(json.dumps(rows, indent=1))
        (args.out / "aggregation.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
