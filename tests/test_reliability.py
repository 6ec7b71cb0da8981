"""Real `flwr run` simulations under injected faults, and a run killed mid-way then resumed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.run.checkpoint import load_latest_checkpoint
from app.run.launch import main, run_simulation
from app.run.outputs import read_metrics
from tasks.synthetic import default_heldout, synthetic_task_infos

pytestmark = pytest.mark.slow

# 8 synthetic tasks (6 contributing, 2 held out), all 6 contributing nodes train every round.
SMALL = ["experiment=tiny_sweep", "contributors_per_round=6", "client.max_steps=8"]
CONTRIBUTING = [i.name for i in synthetic_task_infos(0, 8) if i.name not in default_heldout(0, 8, 2)]


def test_faulty_contributors_are_skipped_or_rejected_and_every_base_is_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    crash, nan, scaled, malformed = CONTRIBUTING[:4]
    faults = f"faults.tasks={{{crash}:raise,{nan}:non_finite,{scaled}:scale,{malformed}:malformed}}"
    status, run_dir = run_simulation([*SMALL, "rounds=3", "faults.enabled=true", faults],
                                     output_root=tmp_path / "out")
    assert status == "finished:completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for r in records[1:]:
        assert r["fused"], r
        assert any(f.startswith(f"{crash}: error reply") for f in r["failures"]), r["failures"]
        # the malformed fault breaks its reply a different way each round; each is a failure with its reason
        expected = {1: "reply has no 'metrics' record", 2: "reply's 'arrays' is of type ConfigRecord",
                    3: "'metrics' has no 'train-loss'"}[r["round"]]
        assert f"{malformed}: malformed reply: {expected}" in " | ".join(r["failures"]), r["failures"]
        reasons = {line.split(" (node")[0]: line for line in r["rejections"]}
        assert "contains non-finite values" in reasons[nan]
        assert "x the reference norm" in reasons[scaled]
        assert set(r["rejections"]) == {reasons[nan], reasons[scaled]}
        assert sorted(r["fused_contributors"]) == sorted(CONTRIBUTING[4:])
    body = load_latest_checkpoint(run_dir).body
    assert all(torch.isfinite(v).all() for v in body.values() if v.is_floating_point())


def test_a_killed_run_resumes_to_the_same_final_body_as_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    # Heads re-initialised per round (seeded): a client keeps no state that a kill could lose. Three of
    # the six contributing tasks per round: the resumed run (new random node ids) must sample the same.
    # Ten short rounds, so the kill (SIGTERM, then the launcher stops the SuperLink) lands mid-run.
    # Back-tracking on, with a threshold that rolls back any drop of the contributing tasks' dev probe (held-out
    # tasks may not steer training, and no decision reads a test row): the resumed run must
    # take back the same reference score (the last one not rolled back) and make the same decisions. Fusion by
    # Nesterov momentum: the server optimizer's state (saved with each checkpoint, restored on a roll-back) must
    # come back exactly too.
    settings = ["experiment=tiny_sweep", "contributors_per_round=3", "client.max_steps=8", "rounds=10",
                "client.head_policy=reinit", "backtrack.threshold=0.0001", "backtrack.monitor=contributing",
                "fusion=nesterov"]
    status, reference = run_simulation(settings, output_root=tmp_path / "reference")
    assert status == "finished:completed"
    decisions = [(r["round"], r["rolled_back"], r["base_round"]) for r in read_metrics(reference)]
    assert any(rolled for _, rolled, _ in decisions), "no round was rolled back: back-tracking was not exercised"

    out = tmp_path / "interrupted"
    run_dir = launch_and_kill_after(out, settings, at_least=2)
    interrupted_at = load_latest_checkpoint(run_dir).round
    assert 2 <= interrupted_at < 10, f"killed too late: {interrupted_at} rounds were complete"

    status, resumed = run_simulation([*settings, f"resume={run_dir}"], output_root=out)
    assert status == "finished:completed" and resumed == run_dir
    assert [(r["round"], r["rolled_back"], r["base_round"]) for r in read_metrics(run_dir)] == decisions
    final, expected = load_latest_checkpoint(run_dir), load_latest_checkpoint(reference)
    assert final.round == expected.round == 10
    for key, tensor in expected.body.items():
        assert torch.equal(final.body[key], tensor), f"{key} differs after resume"
    assert expected.fusion_state and set(final.fusion_state) == set(expected.fusion_state)
    for key, tensor in expected.fusion_state.items():
        assert torch.equal(final.fusion_state[key], tensor), f"fusion state {key} differs after resume"
    assert read_metrics(run_dir)[1]["fusion"] == {"operator": "nesterov", "server_lr": 0.7, "momentum": 0.9}


def launch_and_kill_after(out: Path, settings: list[str], at_least: int) -> Path:
    """Launch a run under ``out`` in a process of its own and kill it (SIGTERM) once round ``at_least`` is
    checkpointed; its run directory."""
    log = out.parent / f"{out.name}-launcher.log"
    with open(log, "w") as sink:  # a file, not a pipe: the launcher can never block on a full pipe
        launcher = subprocess.Popen([sys.executable, "-m", "app.run.launch", "--output-dir", str(out), *settings],
                                    stdout=sink, stderr=subprocess.STDOUT)
    try:
        # Wait for an event, not a duration: the checkpoint of round `at_least` (renamed into place once
        # complete), or the launcher ending without it. A busy machine only makes this wait longer; the callers'
        # later rounds are still to run when the kill lands, so it lands mid-run however slow each round is.
        run_dir = _wait_for_checkpoint(out, launcher, at_least=at_least)
        assert run_dir is not None, f"the run ended before round {at_least}: {log.read_text()[-3000:]}"
    finally:
        launcher.send_signal(signal.SIGTERM)  # the process this test started, by its id
        launcher.wait()  # it stops its SuperLink (SIGTERM, then SIGKILL after a grace period) and exits
    return run_dir


def _wait_for_checkpoint(out: Path, process: subprocess.Popen, at_least: int, poll: float = 0.2) -> Path | None:
    """The run directory under ``out`` once it holds a complete checkpoint of round >= ``at_least``; None if the
    process ends first. No deadline: the polling interval is not a limit."""
    while True:
        ended = process.poll() is not None  # checked before looking, so a checkpoint written last is still seen
        for ckpt in out.glob("*-run*/ckpt-*"):
            if ckpt.name[5:].isdigit() and int(ckpt.name[5:]) >= at_least:
                return ckpt.parent
        if ended:
            return None
        time.sleep(poll)


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
    ("model.name_or_path=/nonexistent/model", "model.name_or_path='/nonexistent/model': no such directory, and not a hub id"),
    ("rounds=two", "config key 'rounds' must be int"),
])
def test_bad_input_fails_before_anything_starts_with_a_clear_message(tmp_path, capsys, override, message):
    assert main([override, "--output-dir", str(tmp_path)]) == 2
    assert message in " ".join(capsys.readouterr().out.split())
    assert not any(tmp_path.iterdir())


def test_a_hanging_contributor_is_dropped_at_the_train_timeout_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    hung = CONTRIBUTING[0]
    status, run_dir = run_simulation([*SMALL, "rounds=1", "eval.start=false", "faults.enabled=true",
                                      f"faults.tasks={{{hung}:hang}}", "faults.hang_s=60",
                                      "federation.train_timeout_s=20"], output_root=tmp_path / "out")
    assert status == "finished:completed"
    (record,) = read_metrics(run_dir)[1:]
    assert f"{hung}: no reply within federation.train_timeout_s" in record["failures"]
    assert hung not in record["fused_contributors"]
    # the server waited for the timeout, not for the hanging node (it sleeps 60 s)
    assert 20 <= record["seconds_train"] < 60
    body = load_latest_checkpoint(run_dir).body
    assert all(torch.isfinite(v).all() for v in body.values() if v.is_floating_point())
