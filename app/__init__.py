"""ColD Fusion on Flower: the Flower apps at the edge, and the packages they call.

* ``app.server_app`` / ``app.client_app``: the Flower ServerApp and ClientApp (read the message, call the
  core, reply);
* ``app.learning``: the machine-learning core (model, training recipe, probe, evaluation views);
* ``app.site``: one contributor's side (which task a node holds, its heads and on-disk state, testing aids);
* ``app.run``: running the federation (configuration, outputs, checkpoints, launcher, sweeps, baselines);
* ``app.report``: reading finished runs (aggregation, markdown report, plots, model card).

The fusion strategy lives in ``strategies`` and the datasets in ``tasks``; neither imports ``app``.
"""

import os

# Thousands of messages each build a model and map a dataset: without this, per-message progress
# bars and "newly initialised head" notices drown the round-by-round log. Set before any Hugging Face
# library is imported (app.learning imports transformers).
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
