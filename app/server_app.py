"""ServerApp: compose the configuration, run the ColD Fusion strategy, write the results.

Every finished round is checkpointed (atomically) before its metrics line is written, so a run that
dies can be resumed from its last complete round with ``resume=<run directory>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from app.checkpoint import resume_checkpoint, save_checkpoint
from app.config import compose_config, to_container
from app.model import body_signature, initial_body, resolve_model, save_fused_model
from app.outputs import RunOutputs, read_metrics, render_table
from strategies.coldfusion import ColdFusion
from tasks.registry import build_pool

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = compose_config(str(run_config.get("experiment", "")), str(run_config.get("overrides", "")))
    resolved = to_container(cfg, "")
    model_path = resolve_model(to_container(cfg, "model"))
    model_spec = json.dumps(to_container(cfg, "model"), sort_keys=True)
    strategy = ColdFusion(
        pool=build_pool(to_container(cfg, "tasks")),
        contributors_per_round=int(cfg.contributors_per_round),
        min_contributions=int(cfg.min_contributions),
        seed=int(cfg.seed),
        expected_nodes=cfg.federation.expected_nodes,
        node_wait_timeout=float(cfg.federation.node_wait_timeout_s),
        eval_every=int(cfg.eval.probe.every),
        fusion=str(cfg.fusion.operator),
        max_update_norm=cfg.validation.max_update_norm,
        max_relative_norm=cfg.validation.max_relative_norm,
        backtrack_threshold=cfg.backtrack.threshold,
        backtrack_monitor=str(cfg.backtrack.monitor),
        query_config={"model": model_spec},
    )

    if cfg.resume:
        checkpoint = resume_checkpoint(cfg.resume, resolved, bool(cfg.resume_allow_config_change))
        outputs = RunOutputs.reopen(cfg.resume, checkpoint.history)
        strategy.rng.setstate(checkpoint.rng_state)
        history, start_arrays, first_round = checkpoint.history, checkpoint.body, checkpoint.round + 1
        log(INFO, "Resuming %s after round %d", outputs.dir, checkpoint.round)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        outputs = RunOutputs.create(Path(str(run_config["output-dir"])) / f"{stamp}-run{context.run_id}", cfg)
        history, start_arrays, first_round = [], initial_body(model_path), 0
    strategy.body_signature = body_signature(start_arrays)
    log(INFO, "ColD Fusion run %s: outputs in %s", context.run_id, outputs.dir)

    def finish_round(record, arrays: ArrayRecord) -> None:
        history.append(asdict(record))
        save_checkpoint(outputs.dir, record.round, arrays.to_torch_state_dict(), strategy.rng.getstate(),
                        history, resolved)
        outputs.append_round(record)

    strategy.on_round = finish_round
    last_score = history[-1][f"probe_{cfg.backtrack.monitor}"] if history else None
    common = {"model": model_spec, "seed": int(cfg.seed)}
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(start_arrays),
        num_rounds=int(cfg.rounds),
        timeout=float(cfg.federation.round_timeout_s),
        train_config=ConfigRecord({**common, "recipe": json.dumps(to_container(cfg, "client")),
                                   "faults": json.dumps(to_container(cfg, "faults"))}),
        evaluate_config=ConfigRecord({**common, "probe": json.dumps(to_container(cfg, "eval.probe")),
                                      "max-length": int(cfg.client.max_length), "device": str(cfg.client.device)}),
        first_round=first_round,
        last_score=last_score,
    )
    save_fused_model(model_path, result.arrays.to_torch_state_dict(), outputs.model_dir)
    log(INFO, "\n%s", render_table(read_metrics(outputs.dir)))
    log(INFO, "Fused model saved to %s (AutoModel.from_pretrained loads it)", outputs.model_dir)
