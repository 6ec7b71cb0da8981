"""The baselines of the paper in the same harness: one-shot "Fused" and centralised multitask training."""

from __future__ import annotations

import torch
from flwr.app import MessageType

from app.run.config import compose_config, to_container
from app.learning.model import initial_body, resolve_model
from app.run.multitask import contributor_steps, main, train_multitask
from tasks.registry import build_pool
from tests.test_strategy import _run, assert_uniform_mean


def test_fused_baseline_is_one_round_with_every_contributing_task(tiny_cfg, small_pool, tiny_path):
    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path, rounds=1,
                                                  contributors_per_round=None, eval_start=False)
    assert records[0].probe == {} and len(records[1].probe) == len(small_pool)  # its start is scored elsewhere
    contributing = sorted(e["name"] for e in small_pool if e["role"] == "contributing")
    assert sorted(records[1].contributors) == contributing  # everyone, once, from the start model
    trained = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trained) == len(contributing)
    final = result.arrays.to_torch_state_dict()  # the plain mean of every contribution (a numpy oracle)
    assert_uniform_mean(final, [r.content["arrays"].to_torch_state_dict() for r in trained])
    assert compose_config("", "rounds=1 contributors_per_round=all").contributors_per_round == "all"


def test_multitask_baseline_trains_one_shared_body_with_a_head_per_dataset(tiny_cfg, tmp_path):
    cfg = compose_config("tiny_sweep", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "rounds=2",
                                        "contributors_per_round=3", "client.max_steps=4"])
    assert contributor_steps(cfg) == 2 * 3 * 4  # the ColD Fusion run's budget: rounds x K x steps
    counts = train_multitask(cfg, tmp_path / "body", steps=24)
    pool = build_pool(to_container(cfg, "tasks"))
    assert set(counts) == {e["name"] for e in pool if e["role"] == "contributing"}  # held-out tasks never train
    assert len(counts) == 6 and sum(counts.values()) == 24
    trained = initial_body(str(tmp_path / "body"))  # a model folder like a fused body: rounds=0 evaluates it
    original = initial_body(resolve_model(to_container(cfg, "model")))
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in original)


def test_multitask_cli_refuses_a_used_folder_and_bad_settings(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("results")
    assert main(["--out", str(tmp_path / "used"), "experiment=tiny_sweep"]) == 2
    assert "is not empty" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert main(["--out", str(tmp_path / "new"), "experiment=tiny_sweep", "client.max_steps=null", "client.epochs=1"]) == 2
    assert "set client.max_steps" in " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "used" / "x").read_text() == "results"
