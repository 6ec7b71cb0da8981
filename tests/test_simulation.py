"""Real Flower: `flwr run` against a private simulation SuperLink with 35 SuperNodes (Ray)."""


import pytest
import yaml
from transformers import AutoModel

from app.run.launch import main, run_simulation, simulation_superlink, submit_run
from app.report import pct
from app.run.outputs import read_metrics

pytestmark = pytest.mark.slow

SHORT_RUN = ["rounds=3", "contributors_per_round=8", "client.max_steps=30", "tasks.train_size=600",
             "tasks.test_size=300", "eval.probe.max_train_examples=600", "eval.probe.max_test_examples=300"]
# the full-finetune view on the held-out tasks, at round 0 and the last round only
FINETUNE_VIEW = ["eval.finetune.every=first_last", "eval.finetune.roles=[heldout]", "eval.finetune.max_steps=15",
                 "eval.finetune.max_train_examples=300", "eval.finetune.max_test_examples=200"]


def test_flwr_run_with_35_supernodes_completes_and_improves_heldout_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation(SHORT_RUN + FINETUNE_VIEW, output_root=tmp_path / "outputs")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert len(records[0]["probe"]) == 35
    assert all(len(r["contributors"]) == 8 and r["fused"] and not r["failures"] for r in records[1:])
    assert all(r["fusion"] == {"operator": "uniform_mean"} for r in records[1:])  # a streaming operator
    assert records[-1]["probe_heldout"] > records[0]["probe_heldout"], records
    heldout = {t for t, role in records[0]["roles"].items() if role == "heldout"}
    assert [set(r["finetune"]) for r in records] == [heldout, set(), set(), heldout]  # its own schedule
    assert all(0 <= r["scores"]["finetune"][t]["macro_f1"] <= 1 for r in (records[0], records[3]) for t in heldout)
    model = AutoModel.from_pretrained(run_dir / "model")
    assert model.config.model_type == "roberta"
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


def test_a_failed_serverapp_is_reported_as_failed_not_completed(tmp_path):
    # Bypass the launcher's own validation: the ServerApp itself must reject the value, and the
    # run's final status (not flwr's exit code) must say so.
    run_config = {"experiment": "", "overrides": "rounds=abc", "output-dir": str(tmp_path)}
    with simulation_superlink(tmp_path / "superlink.log") as env:
        _, status = submit_run(env, run_config, "num-supernodes=2 client-resources-num-cpus=1", tmp_path)
    assert status.startswith("finished:") and status != "finished:completed"


def test_launcher_rejects_a_bad_override_before_starting_anything(tmp_path, capsys):
    assert main(["rounds=abc", "--output-dir", str(tmp_path)]) == 2
    assert "config key 'rounds' must be int" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
