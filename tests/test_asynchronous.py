"""Asynchronous ColD Fusion (strategies/asynchronous.py): in-process runs checked against a numpy oracle, and real
`flwr run` simulations (completion, staleness rejection, kill and resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType
from omegaconf import OmegaConf

from app.client_app import app as client_app
from app.learning.model import initial_body
from app.run.checkpoint import load_latest_checkpoint
from app.run.config import ConfigError, validate_config
from app.run.launch import run_simulation
from app.run.outputs import read_metrics
from app.run.server import round_configs
from app.site.faults import FaultsNotAllowed, straggle
from strategies.asynchronous import AsyncColdFusion, rebased, staleness_weight
from tests.conftest import model_json
from tests.inprocess import InProcessGrid
from tests.test_reliability import launch_and_kill_after


def _run(cfg, pool, tiny_path, versions=3, **kwargs):
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": len(pool)} for i in range(len(pool))])
    kept = []  # (record, base) per version, as the ServerApp's checkpointing gets them
    strategy = AsyncColdFusion(pool=pool, seed=0, node_wait_timeout=5, poll_s=0.0,
                               on_round=lambda record, arrays: kept.append((record, arrays.to_torch_state_dict())),
                               **{"concurrency": 3, "buffer_size": 2, "eval_schedule": {"probe": None}, **kwargs})
    train, evaluate = round_configs(cfg, model_json(cfg))
    start = ArrayRecord(initial_body(tiny_path))
    result = strategy.start(grid, start, num_rounds=versions, timeout=60, train_config=train, evaluate_config=evaluate)
    return grid, strategy, kept, result


def test_versions_fuse_updates_on_the_current_base_weighted_by_staleness(tiny_cfg, small_pool, tiny_path):
    grid, strategy, kept, result = _run(tiny_cfg, small_pool, tiny_path, versions=4)
    records = [r for r, _ in kept]
    assert [r.round for r in records] == [0, 1, 2, 3, 4] and all(r.mode == "async" for r in records)
    sent = {int(m.content["config"]["server-round"]): m for m in grid.sent
            if m.metadata.message_type == MessageType.TRAIN}
    updates = {int(r.content["metrics"]["server-round"]): r.content["arrays"].to_torch_state_dict()
               for r in grid.replies if r.metadata.message_type == MessageType.TRAIN}
    heldout = {e["name"] for e in small_pool if e["role"] == "heldout"}
    assert not heldout & {strategy.nodes[m.metadata.dst_node_id].name for m in sent.values()}
    assert any(s > 0 for r in records for s in r.staleness.values()), "no stale contribution: nothing was tested"
    for (record, base), (_, previous) in zip(kept[1:], kept[:-1]):
        assert record.fused and len(record.fused_contributors) == 2 and not record.rejections
        # staleness: the versions fused between the base a job was sent and the one it was folded into
        for label, job in record.jobs.items():
            assert record.staleness[label] == record.round - 1 - int(sent[job].content["config"]["base-version"])
        # oracle (numpy, float64): the staleness-weighted mean of (previous base + update) over the version's jobs
        weights = {label: 1 / math.sqrt(1 + s) for label, s in record.staleness.items()}
        for key, tensor in base.items():
            if tensor.is_floating_point():
                oracle = sum(w * (previous[key].numpy() + updates[record.jobs[label]][key].numpy()).astype(np.float64)
                             for label, w in weights.items()) / sum(weights.values())
                np.testing.assert_allclose(tensor.numpy(), oracle, rtol=1e-6, atol=1e-7, err_msg=key)
    jobs = [job for r in records for job in r.jobs.values()]
    assert len(jobs) == len(set(jobs)) == 8
    assert all(torch.equal(result.arrays.to_torch_state_dict()[k], v) for k, v in kept[-1][1].items())


def test_a_contribution_older_than_max_staleness_is_rejected_with_its_reason(tiny_cfg, small_pool, tiny_path):
    _, _, kept, _ = _run(tiny_cfg, small_pool, tiny_path, versions=2, max_staleness=0)
    records = [r for r, _ in kept]
    rejections = [line for r in records for line in r.rejections]
    assert any("staleness 1 > asynchronous.max_staleness 0 (trained on version 0, the base is version 1)" in line
               for line in rejections), rejections
    assert all(s == 0 for r in records for s in r.staleness.values())


def test_weights_rebasing_and_refusals():
    assert staleness_weight("inverse_sqrt", 3) == 0.5 and staleness_weight("constant", 9) == 1.0
    with pytest.raises(ValueError, match="unknown asynchronous.staleness_weight 'linear'"):
        staleness_weight("linear", 0)
    base = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([3, 4])}
    out = rebased({"w": torch.tensor([0.5, -1.0]), "ids": torch.tensor([3, 4]), "v": torch.zeros(3)}, base)
    assert out["w"].tolist() == [1.5, 1.0] and out["ids"].tolist() == [3, 4] and out["v"].shape == (3,)
    with pytest.raises(ValueError, match="mode=async refuses"):
        AsyncColdFusion(pool=[], backtrack_threshold=0.01)


def test_async_config_is_checked(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async", "backtrack": {"threshold": 0.02}})
    with pytest.raises(ConfigError, match="'backtrack.threshold' must be null with mode=async"):
        validate_config(cfg)
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async", "asynchronous": {"buffer_size": 0}})
    with pytest.raises(ConfigError, match="'asynchronous.buffer_size' has invalid value 0"):
        validate_config(cfg)
    cfg = OmegaConf.merge(tiny_cfg, {"faults": {"enabled": True, "slow": {"t": 0.5}}})
    with pytest.raises(ConfigError, match="'faults.slow'"):
        validate_config(cfg)


def test_a_straggler_waits_factor_minus_one_times_its_work_and_only_where_allowed(monkeypatch):
    waited = []
    monkeypatch.setattr("app.site.faults.time.sleep", waited.append)
    faults = {"enabled": True, "slow": {"slowtask": 5}}
    assert straggle(faults, "slowtask", {"allow-faults": True}, 2.0) == 8.0 and waited == [8.0]
    assert straggle(faults, "other", {"allow-faults": True}, 2.0) == 0.0
    assert straggle({**faults, "enabled": False}, "slowtask", {}, 2.0) == 0.0
    with pytest.raises(FaultsNotAllowed, match="5x slower"):
        straggle(faults, "slowtask", {"allow-faults": False}, 2.0)


# ---------------------------------------------------------------------- real `flwr run` simulations
ASYNC = ["experiment=tiny_sweep", "mode=async", "client.max_steps=8", "asynchronous.concurrency=3"]


@pytest.mark.slow
def test_flwr_run_async_completes_its_versions_and_rejects_stale_contributions(tmp_path, monkeypatch):
    """A version per contribution (buffer_size=1) with three jobs in flight: the two others of the first three
    were trained on version 0 and arrive after version 1, so max_staleness=0 rejects them, with the reason."""
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation([*ASYNC, "rounds=3", "asynchronous.buffer_size=1",
                                      "asynchronous.max_staleness=0"], output_root=tmp_path / "out")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3] and all(r["mode"] == "async" for r in records)
    heldout = {t for t, role in records[0]["roles"].items() if role == "heldout"}
    for r in records[1:]:
        assert r["fused"] and len(r["fused_contributors"]) == 1 and r["probe_heldout"] is not None
        assert not heldout & {c.split("#")[0] for c in r["contributors"]}, "a held-out task was sent training"
    assert any("> asynchronous.max_staleness 0" in line for r in records for line in r["rejections"])
    body = load_latest_checkpoint(run_dir).body
    assert all(torch.isfinite(v).all() for v in body.values() if v.is_floating_point())
    report = (run_dir / "report" / "report.md").read_text()
    assert "staleness" in report


@pytest.mark.slow
def test_a_killed_async_run_resumes_without_counting_any_contribution_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    settings = [*ASYNC, "rounds=6", "asynchronous.buffer_size=2", "client.head_policy=reinit",
                "eval.probe.every=first_last"]
    out = tmp_path / "interrupted"
    run_dir = launch_and_kill_after(out, settings, at_least=2)
    interrupted_at = load_latest_checkpoint(run_dir).round
    assert 2 <= interrupted_at < 6, f"killed too late: {interrupted_at} versions were complete"
    status, resumed = run_simulation([*settings, f"resume={run_dir}"], output_root=out)
    assert status == "finished:completed" and resumed == run_dir
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(7)), "a version is missing or written twice"
    jobs = [job for r in records for job in r["jobs"].values()]
    assert len(jobs) == len(set(jobs)) == 12, "a contribution was counted twice (or lost from a version)"
    for r in records[1:]:
        assert set(r["jobs"]) == set(r["fused_contributors"]) == set(r["staleness"])
    # the resumed run sent new work, numbered after all the work of the killed run's checkpointed versions
    after = [r for r in records if r["round"] > interrupted_at]
    assert min(j for r in after for j in r["jobs"].values()) > records[interrupted_at]["dispatched"]
    body = load_latest_checkpoint(run_dir).body
    assert all(torch.isfinite(v).all() for v in body.values() if v.is_floating_point())
    assert json.loads((run_dir / "model" / "config.json").read_text())
