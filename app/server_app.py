"""ServerApp: compose the configuration, run the ColD Fusion strategy, write the results.

The run's wiring (strategy from config, outputs, checkpoints, results) is ``app.run.server``; the loop
itself is the strategy's (``strategies.coldfusion``).
"""

from __future__ import annotations

from logging import INFO

from typing import Mapping

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from omegaconf import DictConfig

from app.run.config import compose_config
from app.run.server import ServerRun, round_configs

app = ServerApp()


def compose_run_config(run_config: Mapping[str, object]) -> DictConfig:
    """conf/ composed with the run config's bridge keys: ``overrides`` is the JSON list the launchers send (every
    override exactly as given), or a space-separated string written by hand for ``flwr run --run-config``."""
    return compose_config(str(run_config.get("experiment", "")), str(run_config.get("overrides", "")))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose_run_config(context.run_config)
    run = ServerRun.open(cfg, str(context.run_config["output-dir"]), context.run_id)
    log(INFO, "ColD Fusion run %s: outputs in %s", context.run_id, run.outputs.dir)
    train_config, evaluate_config = round_configs(cfg, run.model_spec)
    result = run.strategy.start(
        grid,
        initial_arrays=ArrayRecord(run.start_arrays),
        num_rounds=int(cfg.rounds),
        train_config=train_config,
        evaluate_config=evaluate_config,
        first_round=run.first_round,
        history=list(run.history),  # a resumed run takes back its decision state from the records
    )
    run.finish(result.arrays)
