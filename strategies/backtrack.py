"""Back-tracking: undo a fused round whose base lowers the monitored dev score by more than a threshold.

The monitored score is the contributing ("seen") tasks' mean first-token probe score on the probe view's **dev**
rows (``strategies.records.DEV_SERIES``; ``tasks.splits.fit_dev``), never on test rows, so that no test row
steers training. Held-out ("unseen") tasks are refused as the monitor: letting them steer training would make
every unseen figure of the run selected on them.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.records import RoundRecord, monitored_score

MONITORS = ("contributing",)


class Backtracking:
    """The rule and its reference: the monitored dev score of the base in effect (the last round that stood)."""

    def __init__(self, threshold: float | None, monitor: str = "contributing") -> None:
        if monitor not in MONITORS:
            raise ValueError(f"backtrack.monitor={monitor!r}: held-out (unseen) tasks must not steer training, or "
                             "every unseen figure of the run is selected on them; use contributing")
        self.threshold, self.monitor = threshold, monitor
        self.reference: float | None = None

    def resume(self, history: Sequence[RoundRecord]) -> None:
        """Take back the reference an uninterrupted run holds after ``history``."""
        self.reference = monitored_score(history, self.monitor)

    def judge(self, record: RoundRecord) -> tuple[float, float] | None:
        """(reference, score) when ``record``'s fusion must be undone; else None, and a round that stands and has
        a dev score becomes the reference."""
        score, before = record.dev_mean("probe", self.monitor), self.reference
        if (self.threshold is not None and record.fused and before is not None and score is not None
                and before - score > self.threshold):
            return before, score
        if score is not None:
            self.reference = score
        return None
