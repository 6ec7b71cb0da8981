"""Real `flwr run` simulations under injected faults, and a run killed mid-way then resumed."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from app.checkpoint import load_latest_checkpoint
from app.launch import main, run_simulation
from app.outputs import read_metrics
from tasks.synthetic import default_heldout, synthetic_task_infos

pytestmark = pytest.mark.slow

# 8 synthetic tasks (6 contributing, 2 held out), all 6 contributing nodes train every round.
SMALL = ["experiment=tiny_sweep", "contributors_per_round=6", "client.max_steps=8"]
CONTRIBUTING = [i.name for i in synthetic_task_infos(0, 8) if i.name not in default_heldout(0, 8, 2)]


def test_faulty_contributors_are_skipped_or_rejected_and_every_base_is_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    crash, nan, scaled = CONTRIBUTING[:3]
    faults = f"faults.tasks={{{crash}:raise,{nan}:non_finite,{scaled}:scale}}"
    status, run_dir = run_simulation([*SMALL, "rounds=3", "faults.enabled=true", faults],
                                     output_root=tmp_path / "out")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for r in records[1:]:
        assert r["fused"], r
        assert any(f.startswith(f"{crash}: error reply") for f in r["failures"]), r["failures"]
        reasons = {line.split(" (node")[0]: line for line in r["rejections"]}
        assert "contains non-finite values" in reasons[nan]
        assert "x the median of the others" in reasons[scaled]
        assert set(r["rejections"]) == {reasons[nan], reasons[scaled]}
    body = load_latest_checkpoint(run_dir).body
    assert all(torch.isfinite(v).all() for v in body.values() if v.is_floating_point())


def test_a_killed_run_resumes_to_the_same_final_body_as_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    # Heads re-initialised per round (seeded): a client keeps no state that a kill could lose. Three of
    # the six contributing tasks per round: the resumed run (new random node ids) must sample the same.
    # Ten short rounds, so the kill (SIGTERM, then the launcher stops the SuperLink) lands mid-run.
    settings = ["experiment=tiny_sweep", "contributors_per_round=3", "client.max_steps=8", "rounds=10",
                "client.head_policy=reinit"]
    status, reference = run_simulation(settings, output_root=tmp_path / "reference")
    assert status == "finished:completed"

    out = tmp_path / "interrupted"
    launcher = subprocess.Popen([sys.executable, "-m", "app.launch", "--output-dir", str(out), *settings],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and launcher.poll() is None:
            checkpoints = list(out.glob("*-run*/ckpt-000[2-9]"))
            if checkpoints:
                break
            time.sleep(0.2)
        assert checkpoints, "the run never reached round 2"
    finally:
        launcher.send_signal(signal.SIGTERM)  # the process this test started, by its id
        launcher.wait(timeout=60)
    run_dir = checkpoints[0].parent
    interrupted_at = load_latest_checkpoint(run_dir).round
    assert 2 <= interrupted_at < 10, f"killed too late: {interrupted_at} rounds were complete"

    status, resumed = run_simulation([*settings, f"resume={run_dir}"], output_root=out)
    assert status == "finished:completed" and resumed == run_dir
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(11))
    final, expected = load_latest_checkpoint(run_dir), load_latest_checkpoint(reference)
    assert final.round == expected.round == 10
    for key, tensor in expected.body.items():
        assert torch.equal(final.body[key], tensor), f"{key} differs after resume"


def test_resuming_with_a_different_configuration_names_the_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    status, run_dir = run_simulation([*SMALL, "rounds=1"], output_root=tmp_path)
    assert status == "finished:completed"
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*SMALL, "rounds=2", "client.lr=0.01", f"resume={run_dir}"]) == 2
    out = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    assert "differs from the checkpoint's in 1 key(s): client.lr: 0.001 -> 0.01" in out
    assert (run_dir / "metrics.jsonl").read_text() == before  # earlier results untouched


@pytest.mark.parametrize("override, message", [
    ("tasks.heldout=[no_such_task]", "unknown task(s) ['no_such_task']"),
    ("model.name_or_path=/nonexistent/model", "cannot load a model config from '/nonexistent/model'"),
    ("rounds=two", "config key 'rounds' must be int"),
])
def test_bad_input_fails_before_anything_starts_with_a_clear_message(tmp_path, capsys, override, message):
    assert main([override, "--output-dir", str(tmp_path)]) == 2
    assert message in " ".join(capsys.readouterr().out.split())
    assert not any(tmp_path.iterdir())
