"""Reading finished runs: ``coldfusion-report`` (markdown report, long CSV, plots) and the model card.

Every module reads the typed round records of ``strategies.records`` (older files are upgraded there):

* ``runs``: loading a run directory (config.yaml, metrics.jsonl, pool.json); ``ReportError`` names the bad file.
* ``aggregate``: pure functions of the records: score series, start/final/best, task rows, baselines, verdicts.
* ``table``: the round-by-round console table (``summary_table``, ``render_table``) and the ``pct`` format.
* ``markdown``: the text of report.md and its markdown tables.
* ``model_card``: the fused model's README.md (Hub metadata and measured scores).
* ``plots``: the three matplotlib figures of a report.
* ``cli``: ``write_report`` (every report file of a run) and ``main``, the ``coldfusion-report`` command.
"""

from app.report.aggregate import evaluated
from app.report.cli import main, write_report
from app.report.model_card import write_model_card
from app.report.plots import PNG_MAGIC
from app.report.runs import ReportError
from app.report.table import pct, render_table, summary_table
from strategies.records import saved_model_record

__all__ = ["PNG_MAGIC", "ReportError", "evaluated", "main", "pct", "render_table", "saved_model_record",
           "summary_table", "write_model_card", "write_report"]
