"""Small guarantees, each with an independent oracle: strict JSON, durable checkpoints, refused configurations,
a site's consent to fault injection, both probe poolings, the contributor's early stopping."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from app.run.checkpoint import save_checkpoint
from app.client_app import app as client_app
from app.run.config import ConfigError, compose_config
from app.site.faults import ALLOW_ENV, FaultsNotAllowed, InjectedFault
from app.learning.model import build_classifier, initial_body, load_tokenizer
from app.run.outputs import RunOutputs, json_line, read_metrics, strict
from app.learning.probe import extract_features
from app.run.sweep import final_scores
from strategies.coldfusion import RoundRecord
from strategies.records import read_records
from tasks.registry import entry_key, load_task_cached
from tasks.tokenize import tokenize_task
from tests.test_client import _train_message


# ------------------------------------------------------------------------------------------ output hygiene

def test_records_are_written_as_strict_json_with_null_for_non_finite_values(tmp_path):
    record = RoundRecord(1, contributors=["a"], train_loss={"a": float("nan")}, probe={"t": float("inf")})
    outputs = RunOutputs(tmp_path)
    outputs.append_round(record)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    back = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert back["train_loss"] == {"a": None} and back["probe"] == {"t": None}
    assert strict([1.0, {"x": (float("-inf"), 2)}]) == [1.0, {"x": [None, 2]}]
    assert json_line({"x": 1.5}) == '{"x": 1.5}\n'
    assert read_metrics(tmp_path)[0]["round"] == 1


def test_the_summary_table_averages_the_losses_of_fused_contributions_only():
    from app.report import render_table

    record = RoundRecord(1, contributors=["a", "b", "c"], fused_contributors=["a", "b"],
                         train_loss={"a": 1.0, "b": 3.0, "c": 100.0}, rejections=["c (node 1): big"],
                         probe_contributing=0.5, probe_heldout=0.4, seconds_train=1.0, seconds_eval=1.0)
    row = next(line for line in render_table([record], width=200).splitlines() if line.strip("│ ").startswith("1 "))
    assert "2.000" in row and "34.667" not in row


# ------------------------------------------------------------------------------------------ durable checkpoints

def test_a_checkpoint_fsyncs_its_files_and_both_directories(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, random.Random(0).getstate(), [], {})
    tmp = str(tmp_path / ".ckpt-0003.tmp")
    assert synced[:3] == [f"{tmp}/body.safetensors", f"{tmp}/state.json", tmp]
    assert synced[3] == str(tmp_path)  # the rename is durable only once the run directory is synced
    assert final.exists() and not Path(tmp).exists()


# ------------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("overrides, message", [
    (["backtrack.threshold=0.02", "eval.probe.every=2"],
     "'backtrack.threshold' needs the probe every round (eval.probe.every=1), got eval.probe.every=2"),
    (["backtrack.threshold=0.02", "eval.probe.every=first_last"], "a round without a probe could not be rolled back"),
    (["federation.train_timeout_s=0"], "'federation.train_timeout_s' has invalid value 0"),
    (["federation.eval_timeout_s=-1"], "'federation.eval_timeout_s' has invalid value -1"),
    (["federation.discovery_timeout_s=abc"], "'federation.discovery_timeout_s' must be int/float"),
    (["federation.run_timeout_s=0"], "'federation.run_timeout_s' has invalid value 0"),
    (["validation.min_peers=0"], "'validation.min_peers' has invalid value 0"),
    (["validation.min_reference_norm=0"], "'validation.min_reference_norm' has invalid value 0"),
    (["faults.tasks={a: explode}"], "'faults.tasks.a' has invalid value 'explode'"),
])
def test_refused_configurations_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        compose_config("", overrides)


def test_back_tracking_with_the_probe_every_round_composes():
    cfg = compose_config("", ["backtrack.threshold=0.02"])
    assert cfg.backtrack.threshold == 0.02 and cfg.eval.probe.every == 1


# ------------------------------------------------------------------------------------------ fault injection

def _faulty_message(tiny_cfg, pool, tiny_path, fault: str):
    from app.run.config import to_container

    message = _train_message(tiny_cfg, pool, initial_body(tiny_path), 1)
    faults = {**to_container(tiny_cfg, "faults"), "enabled": True, "tasks": {pool[2]["name"]: fault}}
    message.content["config"]["faults"] = json.dumps(faults)
    return message


def _context(pool, **node_config):
    return Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": len(pool), **node_config},
                   state=RecordDict(), run_config={})


def test_a_node_refuses_a_fault_unless_it_opted_in(tiny_cfg, pool, tiny_path, node, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(FaultsNotAllowed, match=r"has not opted in: set node config allow-faults=true"):
        client_app(_faulty_message(tiny_cfg, pool, tiny_path, "raise"), _context(pool))
    with pytest.raises(InjectedFault):  # the site's own node config opts in
        client_app(_faulty_message(tiny_cfg, pool, tiny_path, "raise"), _context(pool, **{"allow-faults": "true"}))
    monkeypatch.setenv(ALLOW_ENV, "1")  # or its environment (coldfusion-sim sets it for its own simulation)
    with pytest.raises(InjectedFault):
        client_app(_faulty_message(tiny_cfg, pool, tiny_path, "raise"), _context(pool))
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.raises(FaultsNotAllowed):  # a node config that says no wins over the environment
        client_app(_faulty_message(tiny_cfg, pool, tiny_path, "raise"), _context(pool, **{"allow-faults": "false"}))


# ------------------------------------------------------------------------------------------ both probe poolings

def test_one_feature_pass_gives_the_first_token_and_the_mean_pool(tiny_cfg, tiny_path, pool):
    entry = next(e for e in pool if e["role"] == "contributing")
    info, data = load_task_cached(entry_key(entry))
    tokenizer = load_tokenizer(tiny_path)
    split = tokenize_task(data, tokenizer, int(tiny_cfg.client.max_length))["test"].select(range(20))
    model = build_classifier(tiny_path, info.num_labels, 0)
    features = extract_features(model.base_model, split, tokenizer, batch_size=8, device="cpu")
    # oracle: one example at a time, no padding at all, numpy pooling
    first, mean = [], []
    with torch.inference_mode():
        for row in split:
            ids = torch.tensor([row["input_ids"]])
            hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].numpy()
            first.append(hidden[0])
            mean.append(hidden.mean(axis=0))
    np.testing.assert_allclose(features["first_token"][0], np.stack(first), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features["mean_pool"][0], np.stack(mean), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(features["first_token"][1], np.array([row["labels"] for row in split]))


def test_the_probe_view_reports_both_poolings(tiny_cfg, tiny_path, pool, node):
    from tests.test_client import _evaluate_message

    reply = client_app(_evaluate_message(tiny_cfg, tiny_path, pool[2], "probe"), node)
    metrics = dict(reply.content["metrics"])
    assert {"probe.accuracy", "probe.macro_f1", "probe.mean_pool_accuracy", "probe.mean_pool_macro_f1"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.startswith("probe."))


# ------------------------------------------------------------------------------------------ early stopping, contributor side

def test_client_paper_recipe_stops_early_through_the_client_app(tiny_cfg, pool, tiny_path, node):
    stopping = {"every_examples": 64, "patience_examples": 128, "min_gain": 2.0, "dev_fraction": 0.04,
                "dev_max_examples": 100}
    message = _train_message(tiny_cfg, pool, initial_body(tiny_path), 1, max_steps=None, epochs=20,
                             early_stopping=stopping)
    metrics = client_app(message, node).content["metrics"]
    # a gain of 2.0 is impossible: evaluations after 64, 128, 192 examples; at 192 the window back to 64 is
    # full and the rule stops. 200 train examples less a 4% dev split = 192 = 6 batches of 32.
    assert int(tiny_cfg.client.batch_size) == 32
    assert (metrics["num-examples"], metrics["steps"], metrics["stopped-early"]) == (192, 6, 1)
    assert math.isfinite(metrics["train-loss"])


# ------------------------------------------------------------------------------------------ sweep rows

def test_a_sweep_row_describes_the_saved_model():
    records = [{"round": 0, "fused": False, "probe": {"a": 0.5}, "probe_contributing": 0.5, "probe_heldout": 0.4,
                "finetune": {"a": 0.6}, "finetune_contributing": 0.6, "finetune_heldout": 0.55},
               {"round": 1, "fused": True, "base_round": 1, "probe": {"a": 0.7}, "probe_contributing": 0.7,
                "probe_heldout": 0.6},
               {"round": 2, "fused": True, "rolled_back": True, "base_round": 1, "probe": {"a": 0.1},
                "probe_contributing": 0.1, "probe_heldout": 0.9, "finetune": {"a": 0.2},
                "finetune_contributing": 0.2, "finetune_heldout": 0.2}]
    assert final_scores(read_records(records)) == {"seen": 0.7, "unseen": 0.6, "finetune_seen": None,
                                                   "finetune_unseen": None}


def test_a_sites_contribution_log_is_strict_json_too(tmp_path):
    from app.site.state import SiteState

    site = SiteState(tmp_path / "state")
    site.log_contribution(run_id=1, round=2, task="t", train_loss=float("nan"), examples=3)
    line = (tmp_path / "state" / "contributions.jsonl").read_text()
    assert "NaN" not in line and json.loads(line)["train_loss"] is None


# ------------------------------------------------------------------ output directories that cannot be written
def _unwritable_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Paths that cannot be an output directory here, with the words the message must hold. Root ignores
    permission bits, so "read-only" is /proc (exists, refuses new files even to root)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {"under a file": (a_file / "runs", f"{a_file} is a file, not a directory"),
            "deep under a file": (a_file / "x" / "y", f"{a_file} is a file, not a directory"),
            "a file": (a_file, f"{a_file} is a file, not a directory"),
            "read-only (/proc)": (Path("/proc"), "no file can be created in it")}


@pytest.mark.parametrize("case", ["under a file", "deep under a file", "a file", "read-only (/proc)"])
def test_an_output_directory_that_cannot_be_written_is_named(tmp_path, case):
    from app.run.outputs import OutputDirError, writable_dir

    path, needle = _unwritable_dirs(tmp_path)[case]
    with pytest.raises(OutputDirError) as info:
        writable_dir(path, "--output-dir")
    assert str(info.value).startswith(f"--output-dir {path} cannot be created or written: ") and needle in str(info.value)
    with pytest.raises(OutputDirError, match="run directory"):  # the ServerApp's own check, same words
        RunOutputs.create(path / "20260101-run1" if case != "a file" else path, compose_config("quick", []))


@pytest.mark.parametrize("case", ["under a file", "read-only (/proc)"])
def test_coldfusion_sim_exits_2_on_an_unwritable_output_directory(tmp_path, capsys, monkeypatch, cache_dir, case):
    import app.run.launch as launch
    from rich.console import Console

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the launcher started a SuperLink")
    monkeypatch.setattr(launch, "simulation_superlink", tripwire)
    monkeypatch.setattr(launch, "console", Console(width=10_000))
    path, needle = _unwritable_dirs(tmp_path)[case]
    code = launch.main(["experiment=quick", f"model.cache_dir={cache_dir}", "--output-dir", str(path)])
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"error: --output-dir {path} cannot be created or written: " in out and needle in out
    assert "Traceback" not in out


# ------------------------------------------------------------------ a task that never produced a score is named
def _unscored_history() -> list[RoundRecord]:
    """Three tasks; 'bad' fails on its node every time (a data error), so no record scores it."""
    roles = {"good": "contributing", "bad": "contributing", "unseen": "heldout"}
    failure = "bad#0: evaluation failed: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"
    return [RoundRecord(0, roles=roles, failures=[failure], scores={"probe": {"good": {"accuracy": 0.5},
                                                                              "unseen": {"accuracy": 0.4}}}),
            RoundRecord(1, roles=roles, failures=["bad#0: error reply: UnicodeDecodeError", "good: timeout"],
                        scores={"finetune": {"good": {"accuracy": 0.6}}})]


def test_never_scored_names_the_tasks_no_record_scores_with_their_first_failure():
    from app.report.markdown import never_scored, never_scored_lines

    assert never_scored(_unscored_history()) == {
        "bad": "bad#0: evaluation failed: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"}
    assert never_scored_lines(_unscored_history()) == [
        "bad: never produced a score (first failure: bad#0: evaluation failed: UnicodeDecodeError: 'utf-8' codec "
        "can't decode byte 0xe9)"]
    assert never_scored([RoundRecord(0, roles={"a": "heldout"})]) == {"a": ""}  # no failure recorded: none quoted


def test_the_report_has_a_section_for_tasks_never_scored(tmp_path):
    from app.report.markdown import report_markdown
    from app.report.runs import load_run

    (tmp_path / "metrics.jsonl").write_text("".join(json_line(r.to_dict()) for r in _unscored_history()))
    text = report_markdown(load_run(tmp_path), {}, [])
    assert "## Tasks never scored\n\n- bad: never produced a score (first failure: bad#0: evaluation failed:" in text
    (tmp_path / "metrics.jsonl").write_text(json_line(_unscored_history()[0].to_dict() | {
        "scores": {"probe": {t: {"accuracy": 0.5} for t in ("good", "bad", "unseen")}}}))
    assert "never scored" not in report_markdown(load_run(tmp_path), {}, [])  # every task scored: no section


def test_coldfusion_sim_names_a_task_that_never_scored_at_the_end_of_the_run(tmp_path, capsys, monkeypatch, cache_dir):
    """The end-of-run summary, with stand-ins for Flower: the run 'completed', and the unscored task is named."""
    from contextlib import contextmanager

    import app.run.launch as launch
    from rich.console import Console

    @contextmanager
    def superlink(*_args, **_kwargs):
        yield {}

    def completed(*_args, **_kwargs):  # what the ServerApp would have written, then Flower's final status
        run_dir = tmp_path / "out" / "20260101-000000-run7"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json_line(r.to_dict()) for r in _unscored_history()))
        return 7, "finished:completed"
    monkeypatch.setattr(launch, "simulation_superlink", superlink)
    monkeypatch.setattr(launch, "submit_run", completed)
    monkeypatch.setattr(launch, "console", Console(width=10_000))
    assert launch.main(["experiment=quick", f"model.cache_dir={cache_dir}", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "warning: bad: never produced a score (first failure: bad#0: evaluation failed: UnicodeDecodeError" in out
    assert "good: never" not in out and "unseen: never" not in out
