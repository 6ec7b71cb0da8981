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

from app.run.checkpoint import resume_checkpoint, save_checkpoint
from app.run.config import compose_config, to_container
from app.learning.model import body_signature, initial_body, resolve_model, save_fused_model
from app.run.outputs import RunOutputs, read_metrics, render_table
from app.report import write_model_card, write_report
from strategies.coldfusion import ColdFusion
from strategies.schedule import VIEWS
from tasks.registry import resolve_pool

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = compose_config(str(run_config.get("experiment", "")), str(run_config.get("overrides", "")))
    resolved = to_container(cfg, "")
    model_path = resolve_model(to_container(cfg, "model"))
    model_spec = json.dumps(to_container(cfg, "model"), sort_keys=True)
    pool = resolve_pool(to_container(cfg, "tasks"))  # datasets that resolve nowhere are listed (or fail)
    strategy = ColdFusion(
        pool=pool.entries,
        contributors_per_round=None if cfg.contributors_per_round == "all" else int(cfg.contributors_per_round),
        min_contributions=int(cfg.min_contributions),
        seed=int(cfg.seed),
        expected_nodes=cfg.federation.expected_nodes,
        node_wait_timeout=float(cfg.federation.node_wait_timeout_s),
        discovery_timeout=float(cfg.federation.discovery_timeout_s),
        train_timeout=float(cfg.federation.train_timeout_s),
        eval_timeout=float(cfg.federation.eval_timeout_s),
        eval_schedule={view: cfg.eval[view].every for view in VIEWS},
        finetune_roles=list(cfg.eval.finetune.roles),
        few_shot=cfg.eval.few_shot,
        eval_start=bool(cfg.eval.start),
        fusion=str(cfg.fusion.operator),
        max_update_norm=cfg.validation.max_update_norm,
        max_relative_norm=cfg.validation.max_relative_norm,
        min_peers=int(cfg.validation.min_peers),
        min_reference_norm=float(cfg.validation.min_reference_norm),
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
    outputs.write_json("pool.json", {"missing": [asdict(m) for m in pool.missing]})
    strategy.body_signature = body_signature(start_arrays)
    log(INFO, "ColD Fusion run %s: outputs in %s", context.run_id, outputs.dir)

    def finish_round(record, arrays: ArrayRecord) -> None:
        history.append(asdict(record))
        save_checkpoint(outputs.dir, record.round, arrays.to_torch_state_dict(), strategy.rng.getstate(),
                        history, resolved)
        outputs.append_round(record)

    strategy.on_round = finish_round
    train_config, evaluate_config = round_configs(cfg, model_spec)
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(start_arrays),
        num_rounds=int(cfg.rounds),
        train_config=train_config,
        evaluate_config=evaluate_config,
        first_round=first_round,
        history=list(history),  # a resumed run takes back its decision state from the records
    )
    save_fused_model(model_path, result.arrays.to_torch_state_dict(), outputs.model_dir)
    records = read_metrics(outputs.dir)
    write_model_card(outputs.model_dir, resolved, records, [asdict(m) for m in pool.missing])
    report = write_report(outputs.dir)
    log(INFO, "\n%s", render_table(records))
    log(INFO, "Fused model saved to %s (AutoModel.from_pretrained loads it; README.md is its model card)",
        outputs.model_dir)
    log(INFO, "Report: %s", report)


def round_configs(cfg, model_spec: str) -> tuple[ConfigRecord, ConfigRecord]:
    """What every train and evaluate message carries besides the body (node-specific keys are added
    by the strategy): the model spec, the seed, the contributor recipe, the evaluation settings."""
    common = {"model": model_spec, "seed": int(cfg.seed), "recipe": json.dumps(to_container(cfg, "client"))}
    train = ConfigRecord({**common, "faults": json.dumps(to_container(cfg, "faults"))})
    evaluate = ConfigRecord({**common, "eval": json.dumps(to_container(cfg, "eval"))})
    return train, evaluate
