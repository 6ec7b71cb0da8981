"""ServerApp: compose the configuration, run the ColD Fusion strategy, write the results."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from app.config import compose_config, to_container
from app.model import initial_body, resolve_model, save_fused_model
from app.outputs import RunOutputs, read_metrics, render_table
from strategies.coldfusion import ColdFusion
from tasks.registry import build_pool

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = compose_config(str(run_config.get("experiment", "")), str(run_config.get("overrides", "")))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outputs = RunOutputs.create(Path(str(run_config["output-dir"])) / f"{stamp}-run{context.run_id}", cfg)
    log(INFO, "ColD Fusion run %s: outputs in %s", context.run_id, outputs.dir)

    model_path = resolve_model(to_container(cfg, "model"))
    pool = build_pool(to_container(cfg, "tasks"))
    common = {"model": json.dumps(to_container(cfg, "model"), sort_keys=True), "seed": int(cfg.seed)}
    train_config = ConfigRecord({**common, "recipe": json.dumps(to_container(cfg, "client"))})
    evaluate_config = ConfigRecord({
        **common,
        "probe": json.dumps(to_container(cfg, "eval.probe")),
        "max-length": int(cfg.client.max_length),
        "device": str(cfg.client.device),
    })
    strategy = ColdFusion(
        pool=pool,
        contributors_per_round=int(cfg.contributors_per_round),
        min_contributions=int(cfg.min_contributions),
        seed=int(cfg.seed),
        expected_nodes=cfg.federation.expected_nodes,
        node_wait_timeout=float(cfg.federation.node_wait_timeout_s),
        eval_every=int(cfg.eval.probe.every),
        fusion=str(cfg.fusion.operator),
        on_round=lambda record, _arrays: outputs.append_round(record),
    )
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(initial_body(model_path)),
        num_rounds=int(cfg.rounds),
        timeout=float(cfg.federation.round_timeout_s),
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    save_fused_model(model_path, result.arrays.to_torch_state_dict(), outputs.model_dir)
    log(INFO, "\n%s", render_table(read_metrics(outputs.dir)))
    log(INFO, "Fused model saved to %s (AutoModel.from_pretrained loads it)", outputs.model_dir)
