"""ColD Fusion on Flower: the ServerApp, the ClientApp and the machine-learning core they share."""

import os

# Thousands of messages each build a model and map a dataset: without this, per-message progress
# bars and "newly initialised head" notices drown the round-by-round log.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import transformers  # noqa: E402  (after the environment above is set)

transformers.utils.logging.disable_progress_bar()
