"""What the ServerApp does, apart from Flower's entry point: build the strategy from the configuration, open
the run's output directory (a new one, or the one being resumed), keep each finished round (checkpoint, then
its metrics line) and write the results (the fused model, its card, the report).

Every finished round is checkpointed (atomically) before its metrics line is written, so a run that dies can
be resumed from its last complete round with ``resume=<run directory>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from omegaconf import DictConfig

from app.learning.model import body_signature, initial_body, resolve_model, save_fused_model
from app.report import render_table, write_model_card, write_report
from app.report.markdown import never_scored_lines
from app.run.checkpoint import resume_checkpoint, save_checkpoint
from app.run.config import to_container
from app.run.outputs import RunOutputs, read_round_records
from strategies.asynchronous import AsyncColdFusion
from strategies.coldfusion import ColdFusion
from strategies.fusion import build_operator
from strategies.records import RoundRecord
from strategies.schedule import VIEWS
from strategies.transport import to_state_dict
from tasks.registry import PoolResolution, resolve_pool


def build_strategy(cfg: DictConfig, pool: PoolResolution, model_spec: str) -> ColdFusion:
    """The ColD Fusion strategy with every setting from ``cfg``: rounds (``mode=sync``) or asynchronous versions."""
    if cfg.mode == "async":
        settings = cfg.asynchronous
        return AsyncColdFusion(concurrency=int(settings.concurrency), buffer_size=int(settings.buffer_size),
                               max_staleness=settings.max_staleness, staleness_rule=str(settings.staleness_weight),
                               aggregation=str(settings.aggregation), server_lr=float(settings.server_lr),
                               **strategy_settings(cfg, pool, model_spec))
    return ColdFusion(**strategy_settings(cfg, pool, model_spec))


def strategy_settings(cfg: DictConfig, pool: PoolResolution, model_spec: str) -> dict[str, Any]:
    """The settings both modes share."""
    return dict(
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
        fusion=build_operator(to_container(cfg, "fusion")),
        max_update_norm=cfg.validation.max_update_norm,
        max_relative_norm=cfg.validation.max_relative_norm,
        min_peers=int(cfg.validation.min_peers),
        min_reference_norm=float(cfg.validation.min_reference_norm),
        backtrack_threshold=cfg.backtrack.threshold,
        backtrack_monitor=str(cfg.backtrack.monitor),
        query_config={"model": model_spec},
        pinned=list(cfg.faults.pinned or []) if cfg.faults.enabled else [],
        progress_s=float(cfg.federation.progress_s),
        transport=str(cfg.transport.dtype),
    )


def round_configs(cfg: DictConfig, model_spec: str) -> tuple[ConfigRecord, ConfigRecord]:
    """What every train and evaluate message carries besides the body (node-specific keys are added
    by the strategy): the model spec, the seed, the contributor recipe, the evaluation settings."""
    common = {"model": model_spec, "seed": int(cfg.seed), "recipe": json.dumps(to_container(cfg, "client"))}
    train = ConfigRecord({**common, "faults": json.dumps(to_container(cfg, "faults"))})
    evaluate = ConfigRecord({**common, "eval": json.dumps(to_container(cfg, "eval"))})
    return train, evaluate


@dataclass
class ServerRun:
    """One run on the server: its configuration, strategy, outputs and where it starts from."""

    cfg: DictConfig
    resolved: dict[str, Any]
    model_path: str
    model_spec: str  # the model settings as JSON: sent with every message, so nodes build the same model
    pool: PoolResolution
    strategy: ColdFusion
    outputs: RunOutputs
    start_arrays: dict
    first_round: int
    history: list[RoundRecord] = field(default_factory=list)

    @classmethod
    def open(cls, cfg: DictConfig, output_root: str, run_id: int) -> "ServerRun":
        """A new run directory under ``output_root``, or the resumed one (``cfg.resume``) with its checkpoint."""
        resolved = to_container(cfg)
        model_path = resolve_model(to_container(cfg, "model"))
        model_spec = json.dumps(to_container(cfg, "model"), sort_keys=True)
        pool = resolve_pool(to_container(cfg, "tasks"))  # datasets that resolve nowhere are listed (or fail)
        strategy = build_strategy(cfg, pool, model_spec)
        if cfg.resume:
            checkpoint = resume_checkpoint(cfg.resume, resolved, bool(cfg.resume_allow_config_change))
            outputs = RunOutputs.reopen(cfg.resume, checkpoint.history)
            strategy.rng.setstate(checkpoint.rng_state)
            strategy.fusion.load_state_dict(checkpoint.fusion_state)  # a server optimizer's momentum, if any
            run = cls(cfg, resolved, model_path, model_spec, pool, strategy, outputs, checkpoint.body, checkpoint.round + 1,
                      list(checkpoint.history))
            log(INFO, "Resuming %s after round %d", outputs.dir, checkpoint.round)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            outputs = RunOutputs.create(Path(output_root) / f"{stamp}-run{run_id}", cfg)
            run = cls(cfg, resolved, model_path, model_spec, pool, strategy, outputs, initial_body(model_path), 0)
        outputs.write_json("pool.json", {"missing": [asdict(m) for m in pool.missing]})
        strategy.body_signature = body_signature(run.start_arrays)
        strategy.on_round = run.keep_round
        return run

    def keep_round(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """A finished round: checkpoint first, then its metrics line (a crash between them replays the round)."""
        self.history.append(record)
        save_checkpoint(self.outputs.dir, record.round, to_state_dict(arrays), self.strategy.rng.getstate(),
                        self.history, self.resolved, self.strategy.fusion.state_dict())
        self.outputs.append_round(record)

    def finish(self, arrays: ArrayRecord) -> None:
        """The fused model with its card, the report, and the round-by-round table in the log."""
        save_fused_model(self.model_path, to_state_dict(arrays), self.outputs.model_dir)
        records = read_round_records(self.outputs.dir)
        write_model_card(self.outputs.model_dir, self.resolved, records, [asdict(m) for m in self.pool.missing])
        report = write_report(self.outputs.dir)
        log(INFO, "\n%s", render_table(records))
        for line in never_scored_lines(records):  # absent from every mean: the log says so too (and report.md)
            log(WARNING, "%s", line)
        log(INFO, "Fused model saved to %s (AutoModel.from_pretrained loads it; README.md is its model card)",
            self.outputs.model_dir)
        log(INFO, "Report: %s", report)
