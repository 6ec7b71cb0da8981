"""The baselines of the paper in the same harness: one-shot "Fused" and centralised multitask training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from app.run.config import compose_config, to_container
import app.run.multitask as multitask
from app.learning.model import body_state, initial_body, resolve_model
from app.run.multitask import contributor_steps, main, train_multitask
from tasks.registry import build_pool
from tests.test_model import checkpoint_body
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


def test_multitask_baseline_trains_one_shared_body_with_a_head_per_dataset(tiny_cfg, tmp_path, monkeypatch):
    """Before its first step every head sits on one body, and that body is the start model's, tensor for tensor
    (the oracle: the checkpoint read with safetensors); the saved model is that shared body once trained."""
    cfg = compose_config("tiny_sweep", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "rounds=2",
                                        "contributors_per_round=3", "client.max_steps=4"])
    assert contributor_steps(cfg) == 2 * 3 * 4  # the ColD Fusion run's budget: rounds x K x steps
    built, first, build_classifier, train_steps = [], {}, multitask.build_classifier, multitask.train_steps

    def build(*args, **kwargs):
        built.append(build_classifier(*args, **kwargs))
        return built[-1]

    def steps(batches, optimizer, device):  # looks at the shared body just before the first step
        for model, batch in batches:
            if not first:
                first["body"], first["shared"] = body_state(model), {id(m.base_model) for m in built}
            yield from train_steps([(model, batch)], optimizer, device)

    monkeypatch.setattr(multitask, "build_classifier", build)
    monkeypatch.setattr(multitask, "train_steps", steps)
    counts = train_multitask(cfg, tmp_path / "body", steps=24)
    pool = build_pool(to_container(cfg, "tasks"))
    assert set(counts) == {e["name"] for e in pool if e["role"] == "contributing"}  # held-out tasks never train
    assert len(counts) == 6 and sum(counts.values()) == 24 and len(built) == 6
    assert len(first["shared"]) == 1  # every head on the one body
    start = checkpoint_body(resolve_model(to_container(cfg, "model")))
    assert first["body"].keys() == start.keys()
    assert [k for k, v in start.items() if not torch.equal(first["body"][k], v)] == []  # the start body, exactly
    trained, final = initial_body(str(tmp_path / "body")), body_state(built[0])  # rounds=0 evaluates the folder
    assert all(torch.equal(trained[k], final[k]) for k in start)  # the saved model is the shared body, trained
    assert any(not torch.equal(final[k], start[k]) for k in start)


def test_multitask_cli_refuses_a_used_folder_and_bad_settings(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("results")
    assert main(["--out", str(tmp_path / "used"), "experiment=tiny_sweep"]) == 2
    assert "is not empty" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert main(["--out", str(tmp_path / "new"), "experiment=tiny_sweep", "client.max_steps=null", "client.epochs=1"]) == 2
    assert "set client.max_steps" in " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "used" / "x").read_text() == "results"


def test_the_realdata_benchmark_reuses_a_finished_cold_fusion_run_and_refuses_a_folder_without_one(tmp_path, capsys):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "realdata.py"
    spec = importlib.util.spec_from_file_location("realdata_benchmark", script)
    realdata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realdata)
    recorded, log = script.parent / "results" / "realdata-poolings", []
    assert realdata.reused_run(recorded, log) == recorded.resolve()
    assert "reused, not re-run" in log[0] and str(recorded.resolve()) in log[0]  # run.md says so
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as exit_:
        realdata.reused_run(tmp_path, [])
    assert exit_.value.code == 2 and f"--cold {tmp_path}: no metrics.jsonl there" in capsys.readouterr().err
