"""Real Flower: `flwr run` against a private simulation SuperLink with 35 SuperNodes (Ray)."""


import pytest
import torch
import yaml
from transformers import AutoModel

from app.learning.model import initial_body, resolve_model
from app.run.checkpoint import load_latest_checkpoint
from app.run.launch import main, run_simulation, simulation_superlink, submit_run
from app.report import pct
from app.run.outputs import read_metrics

pytestmark = pytest.mark.slow

# discovery: 35 Ray actors importing torch at once took more than the default 120 s on a loaded 2-core machine
SHORT_RUN = ["rounds=3", "contributors_per_round=8", "client.max_steps=30", "tasks.train_size=600",
             "tasks.test_size=300", "eval.probe.max_train_examples=600", "eval.probe.max_test_examples=300",
             "federation.discovery_timeout_s=600"]
# the full-finetune view on the held-out tasks, at round 0 and the last round only
FINETUNE_VIEW = ["eval.finetune.every=first_last", "eval.finetune.roles=[heldout]", "eval.finetune.max_steps=15",
                 "eval.finetune.max_train_examples=300", "eval.finetune.max_test_examples=200"]


def assert_records_consistent(records: list[dict]) -> None:
    """What each record says agrees with itself: its role means are the means of its own per-task primary
    scores over the role's classification tasks (recomputed here), its per-task scores are those of its
    ``scores`` detail, and a round without failures or rejections fused every one of its contributors."""
    for r in records:
        regression = set(r["regression"])
        for view in ("probe", "finetune"):
            for role in ("contributing", "heldout"):
                values = [v for t, v in r[view].items() if r["roles"][t] == role and t not in regression]
                expected = sum(values) / len(values) if values else None
                assert r[f"{view}_{role}"] == pytest.approx(expected, abs=1e-12), (r["round"], view, role)
            for task, value in r[view].items():
                detail = r["scores"][view][task]
                assert value == detail["pearson" if task in regression else "accuracy"], (r["round"], view, task)
        if r["round"] > 0 and not r["failures"] and not r["rejections"]:
            assert r["fused"] and sorted(r["fused_contributors"]) == sorted(r["contributors"])
            assert set(r["train_loss"]) == set(r["update_norms"]) == set(r["contributors"])
            assert not set(r["contributors"]) & {t for t, role in r["roles"].items() if role == "heldout"}


def test_flwr_run_with_35_supernodes_completes_and_saves_its_last_base(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation(SHORT_RUN + FINETUNE_VIEW, output_root=tmp_path / "outputs")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert len(records[0]["probe"]) == 35
    assert all(len(r["contributors"]) == 8 and r["fused"] and not r["failures"] for r in records[1:])
    assert all(r["fusion"] == {"operator": "uniform_mean"} for r in records[1:])  # a streaming operator
    assert_records_consistent(records)
    # every round fused and stood: the saved model is round 3's base, the one checkpointed after round 3, bit for bit
    assert [r["base_round"] for r in records] == [0, 1, 2, 3] and not any(r["rolled_back"] for r in records)
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint.round == 3
    saved = AutoModel.from_pretrained(run_dir / "model").state_dict()
    assert set(saved) - set(checkpoint.body) == {"pooler.dense.weight", "pooler.dense.bias"}  # tiny's body has none
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in checkpoint.body.items())
    model_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    start = initial_body(resolve_model(model_cfg))  # the run's start model: the seeded tiny model, from the cache
    assert any(not torch.equal(saved[k], start[k]) for k in start), "the saved model is the start model"
    heldout = {t for t, role in records[0]["roles"].items() if role == "heldout"}
    assert [set(r["finetune"]) for r in records] == [heldout, set(), set(), heldout]  # its own schedule
    assert all(0 <= r["scores"]["finetune"][t]["macro_f1"] <= 1 for r in (records[0], records[3]) for t in heldout)
    assert AutoModel.from_pretrained(run_dir / "model").config.model_type == "roberta"
    assert "rounds: 3" in (run_dir / "config.yaml").read_text()
    # every run leaves a report with its plots, and a model card that states the measured numbers
    report = (run_dir / "report" / "report.md").read_text()
    for plot in ("views_vs_rounds.png", "seen_unseen.png", "task_gain.png"):
        assert (run_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in report
    card = (run_dir / "model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and heldout <= set(header["datasets"])
    for view in ("probe", "finetune"):
        start, final = records[0][f"{view}_heldout"], records[-1][f"{view}_heldout"]
        assert f"| {pct(start)} | {pct(final)} | 3 |" in card, card  # start and final held-out means, round 3


def test_flwr_run_with_35_supernodes_fuses_with_an_all_contributions_operator(tmp_path, monkeypatch):
    # The trimmed mean needs every contribution of the round at once (strategies/fusion/robust.py): one short
    # round of 35 SuperNodes, 8 contributors, the probe at round 0 and after the round.
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation(["rounds=1", "contributors_per_round=8", "client.max_steps=5",
                                      "tasks.train_size=200", "tasks.test_size=100", "eval.probe.max_train_examples=200",
                                      "eval.probe.max_test_examples=100", "fusion=trimmed_mean", "fusion.beta=0.25"],
                                     output_root=tmp_path / "outputs")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert records[1]["fused"] and len(records[1]["fused_contributors"]) == 8 and not records[1]["failures"]
    assert records[1]["fusion"] == {"operator": "trimmed_mean", "beta": 0.25}
    assert len(records[1]["probe"]) == 35
    assert "- Fusion: trimmed_mean (beta=0.25)" in (run_dir / "report" / "report.md").read_text()


def test_a_failed_serverapp_is_reported_as_failed_not_completed(tmp_path, capsys):
    # Bypass the launcher's own validation: the ServerApp itself must reject the value, and the
    # run's final status (not flwr's exit code) must say so; the run's log (streamed to stdout) says why, naming
    # the key, and nothing was written for the run.
    run_config = {"experiment": "", "overrides": "rounds=abc", "output-dir": str(tmp_path / "outputs")}
    with simulation_superlink(tmp_path / "superlink.log") as env:
        _, status = submit_run(env, run_config, "num-supernodes=2 client-resources-num-cpus=1", tmp_path)
    assert status.startswith("finished:") and status != "finished:completed"
    log = capsys.readouterr().out
    assert "config key 'rounds' must be int" in log, log[-3000:]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_launcher_rejects_a_bad_override_before_starting_anything(tmp_path, capsys):
    assert main(["rounds=abc", "--output-dir", str(tmp_path)]) == 2
    assert "config key 'rounds' must be int" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
