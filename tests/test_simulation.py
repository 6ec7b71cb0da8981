"""Real Flower: `flwr run` against a private simulation SuperLink with 35 SuperNodes (Ray)."""


import pytest
from transformers import AutoModel

from app.launch import main, run_simulation, simulation_superlink, submit_run
from app.outputs import read_metrics

pytestmark = pytest.mark.slow

SHORT_RUN = ["rounds=3", "contributors_per_round=8", "client.max_steps=30", "tasks.train_size=600",
             "tasks.test_size=300", "eval.probe.max_train_examples=600", "eval.probe.max_test_examples=300"]


def test_flwr_run_with_35_supernodes_completes_and_improves_heldout_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation(SHORT_RUN, output_root=tmp_path / "outputs")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert len(records[0]["probe"]) == 35
    assert all(len(r["contributors"]) == 8 and r["fused"] and not r["failures"] for r in records[1:])
    assert records[-1]["probe_heldout"] > records[0]["probe_heldout"], records
    model = AutoModel.from_pretrained(run_dir / "model")
    assert model.config.model_type == "roberta"
    assert "rounds: 3" in (run_dir / "config.yaml").read_text()


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
