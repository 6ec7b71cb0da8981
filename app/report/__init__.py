"""Reading finished runs: ``coldfusion-report`` (markdown report, long CSV, plots) and the model card."""

from app.report.writer import *  # noqa: F401,F403  (temporary, during the split)
from app.report.writer import base_rounds, evaluated, main, saved_model_record, write_model_card, write_report, PNG_MAGIC  # noqa: F401
