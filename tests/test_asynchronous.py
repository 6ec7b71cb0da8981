"""Asynchronous ColD Fusion (strategies/asynchronous.py): in-process runs with a straggler, checked against numpy
oracles of each aggregation rule written from its definition, and real `flwr run` simulations (completion,
staleness rejection, kill and resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType
from omegaconf import OmegaConf, open_dict

from app.client_app import app as client_app
from app.learning.model import initial_body
from app.run.checkpoint import load_latest_checkpoint
from app.run.config import ConfigError, validate_config
from app.run.launch import run_simulation
from app.run.outputs import read_metrics
from app.run.server import round_configs
from app.site.faults import FaultsNotAllowed, straggle
from strategies.asynchronous import AsyncColdFusion, fold_terms, rebased, staleness_weight
from tests.conftest import model_json
from tests.inprocess import InProcessGrid
from tests.test_reliability import launch_and_kill_after


class LateGrid(InProcessGrid):
    """The node sent the first training job is a straggler: its training replies arrive only after ``delay`` more
    pulls were tried (the strategy polls every job in flight, so it keeps trying); the number of training jobs in
    flight is recorded after every push of work."""

    def __init__(self, pool, delay: int) -> None:
        super().__init__(client_app, [{"partition-id": i, "num-partitions": len(pool)} for i in range(len(pool))])
        self.slow: int | None = None
        self.delay = delay
        self.held: list[tuple[int, object]] = []  # (released at this many pull attempts, reply)
        self.attempts = 0
        self.in_flight: list[int] = []  # training jobs in flight after each push of work

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if self.slow is None and messages[0].metadata.message_type == MessageType.TRAIN:
            self.slow = messages[0].metadata.dst_node_id
        for reply in [r for r in self.replies[len(self.replies) - len(messages):]  # this push's, not a released one
                      if r.metadata.src_node_id == self.slow and r.metadata.message_type == MessageType.TRAIN]:
            self._arrived.remove(reply)
            self.held.append((self.attempts + self.delay, reply))
        if all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            train = sum(m.metadata.message_type == MessageType.TRAIN for m in self.sent)
            self.in_flight.append(train - sum(r.metadata.message_type == MessageType.TRAIN for r in self.pulled))
        return ids

    def pull_messages(self, message_ids):
        self.attempts += 1
        for held in [h for h in self.held if h[0] <= self.attempts]:
            self.held.remove(held)
            self._arrived.append(held[1])
        return super().pull_messages(message_ids)


def _run(cfg, pool, tiny_path, versions=3, grid=None, timeout=60, **kwargs):
    grid = grid or InProcessGrid(client_app, [{"partition-id": i, "num-partitions": len(pool)}
                                              for i in range(len(pool))])
    kept = []  # (record, base) per version, as the ServerApp's checkpointing gets them
    strategy = AsyncColdFusion(pool=pool, seed=0, node_wait_timeout=5, poll_s=0.0,
                               on_round=lambda record, arrays: kept.append((record, arrays.to_torch_state_dict())),
                               **{"concurrency": 3, "buffer_size": 2, "eval_schedule": {"probe": None}, **kwargs})
    train, evaluate = round_configs(cfg, model_json(cfg))
    start = ArrayRecord(initial_body(tiny_path))
    result = strategy.start(grid, start, num_rounds=versions, timeout=timeout, train_config=train,
                            evaluate_config=evaluate)
    return grid, strategy, kept, result


@pytest.mark.parametrize("aggregation,server_lr,fusion", [("normalised", 1.0, "uniform_mean"),
                                                          ("fedbuff", 0.5, "uniform_mean"), ("fedbuff", 1.0, "median")])
def test_versions_fuse_updates_on_the_current_base_by_the_aggregation_rule(tiny_cfg, small_pool, tiny_path,
                                                                           aggregation, server_lr, fusion):
    # One straggler (the first node sent work: its replies arrive 6 pull attempts late) among 6 contributors, 3
    # training at once.
    grid = LateGrid(small_pool, delay=6)
    # (a long timeout: a held job must never expire, however slowly a loaded machine trains the others in push)
    _, strategy, kept, result = _run(tiny_cfg, small_pool, tiny_path, versions=4, grid=grid, timeout=3600,
                                     aggregation=aggregation, server_lr=server_lr, fusion=fusion)
    records = [r for r, _ in kept]
    assert [r.round for r in records] == [0, 1, 2, 3, 4] and all(r.mode == "async" for r in records)
    sent = {int(m.content["config"]["server-round"]): m for m in grid.sent
            if m.metadata.message_type == MessageType.TRAIN}
    updates = {int(r.content["metrics"]["server-round"]): r.content["arrays"].to_torch_state_dict()
               for r in grid.replies if r.metadata.message_type == MessageType.TRAIN}
    heldout = {e["name"] for e in small_pool if e["role"] == "heldout"}
    assert not heldout & {strategy.nodes[m.metadata.dst_node_id].name for m in sent.values()}
    # concurrency: 3 jobs in flight, never more; the slots are refilled as replies come in
    assert max(grid.in_flight) == 3 and grid.in_flight.count(3) >= 3, grid.in_flight
    # lateness: the straggler's first job was overtaken: it is folded two or more versions after the one it trained on
    slow = strategy.nodes[grid.slow].label
    late = [r.staleness[slow] for r in records if slow in r.staleness]
    assert late and max(late) >= 2, (late, [r.staleness for r in records])
    for (record, base), (_, previous) in zip(kept[1:], kept[:-1]):
        assert record.fused and len(record.fused_contributors) == 2 and not record.rejections
        # staleness: the versions fused between the base a job was sent and the one it was folded into
        for label, job in record.jobs.items():
            assert record.staleness[label] == record.round - 1 - int(sent[job].content["config"]["base-version"])
        # oracles (numpy, float64), from each rule's definition: s = 1/sqrt(1 + staleness), u = the update,
        # normalised: sum(s * (previous + lr * u)) / sum(s); fedbuff: previous + lr / |buffer| * sum(s * u) for the
        # mean, the coordinate-wise median of previous + lr * s * u for the median
        s = {label: 1 / math.sqrt(1 + st) for label, st in record.staleness.items()}
        for key, tensor in base.items():
            if not tensor.is_floating_point():
                continue
            prev = previous[key].numpy().astype(np.float64)
            u = {label: updates[record.jobs[label]][key].numpy().astype(np.float64) for label in s}
            if aggregation == "normalised":
                oracle = sum(s[c] * (prev + server_lr * u[c]) for c in s) / sum(s.values())
            elif fusion == "median":
                oracle = np.median([prev + server_lr * s[c] * u[c] for c in s], axis=0)
            else:
                oracle = prev + server_lr / len(s) * sum(s[c] * u[c] for c in s)
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
    # (weight in the fold, factor on the update), by hand: s = 1/sqrt(1 + 3) = 0.5
    assert fold_terms("normalised", "inverse_sqrt", 3, 0.8) == (0.5, 0.8)
    assert fold_terms("fedbuff", "inverse_sqrt", 3, 0.8) == (1.0, 0.4)
    assert fold_terms("fedbuff", "constant", 3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="unknown asynchronous.aggregation 'mean'"):
        AsyncColdFusion(pool=[], aggregation="mean")
    with pytest.raises(ValueError, match="asynchronous.server_lr has invalid value 0"):
        AsyncColdFusion(pool=[], server_lr=0)


@pytest.mark.parametrize("fusion", [{"operator": "median"}, {"operator": "trimmed_mean", "beta": 0.2}])
def test_async_robust_operators_weighted_by_staleness_are_refused_at_start(tiny_cfg, fusion):
    # They count each contribution once: the normalised fold's staleness weight would crash the first stale reply.
    name = fusion["operator"]
    with pytest.raises(ValueError, match=rf"mode=async with fusion={name}: .*asynchronous.aggregation=fedbuff"):
        AsyncColdFusion(pool=[], fusion=fusion)
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async"})
    with open_dict(cfg):
        cfg.fusion = fusion
    with pytest.raises(ConfigError, match=rf"mode=async with fusion={name}: .*staleness_weight=constant"):
        validate_config(cfg)
    for fine in ({"asynchronous": {"aggregation": "fedbuff"}}, {"asynchronous": {"staleness_weight": "constant"}},
                 {"mode": "sync"}):
        validate_config(OmegaConf.merge(cfg, fine))
    AsyncColdFusion(pool=[], fusion=fusion, aggregation="fedbuff")
    AsyncColdFusion(pool=[], fusion=fusion, staleness_rule="constant")


def test_async_config_is_checked(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async", "backtrack": {"threshold": 0.02}})
    with pytest.raises(ConfigError, match="'backtrack.threshold' must be null with mode=async"):
        validate_config(cfg)
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async", "asynchronous": {"buffer_size": 0}})
    with pytest.raises(ConfigError, match="'asynchronous.buffer_size' has invalid value 0"):
        validate_config(cfg)
    cfg = OmegaConf.merge(tiny_cfg, {"mode": "async", "asynchronous": {"server_lr": -1.0}})
    with pytest.raises(ConfigError, match="'asynchronous.server_lr' has invalid value -1.0"):
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
