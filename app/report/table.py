"""The round-by-round console table of a run (rich), and ``pct``, the percent format every report text uses."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from strategies.records import RoundRecord


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_table(records: Iterable[RoundRecord]) -> Table:
    """Round-by-round table: contributors, skipped ones (failed or rejected), the mean train loss of the fused
    contributions, both probes' means (first token: the paper's view; mean pooling), the array megabytes sent to and
    received from nodes (training and evaluation together), seconds."""
    table = Table(title="ColD Fusion: linear-probe score of the base after each round")
    for column in ("round", "contributors", "skipped", "train loss", "probe seen", "probe unseen",
                   "mean-pool seen", "mean-pool unseen", "MB out/in", "seconds"):
        table.add_column(column, justify="right")
    for r in records:
        losses = [r.train_loss[c] for c in r.fused_contributors if r.train_loss.get(c) is not None]
        table.add_row(
            str(r.round) + (" (rolled back)" if r.rolled_back else ""),
            str(len(r.contributors)) if r.round else "(start)",
            str(len(r.failures) + len(r.rejections)),
            f"{sum(losses) / len(losses):.3f}" if losses else "-",
            pct(r.probe_contributing),
            pct(r.probe_heldout),
            pct(r.probe_mean_pool_contributing),
            pct(r.probe_mean_pool_heldout),
            megabytes(r),
            f"{r.seconds_train + r.seconds_eval:.1f}",
        )
    return table


def megabytes(record: RoundRecord) -> str:
    """'sent/received' in MB over both phases; '-' for records that did not count bytes."""
    sent = [record.bytes_train_sent, record.bytes_eval_sent]
    received = [record.bytes_train_received, record.bytes_eval_received]
    if None in sent + received:
        return "-"
    return f"{sum(sent) / 1e6:.1f}/{sum(received) / 1e6:.1f}"


def render_table(records: Iterable[RoundRecord], width: int = 110) -> str:
    """The summary table as plain text (for logs and the report CLI's output)."""
    with open(os.devnull, "w") as sink:
        console = Console(width=width, record=True, file=sink)
        console.print(summary_table(records))
        return console.export_text()
