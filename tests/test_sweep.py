"""Config groups compose; real Hydra multirun sweeps over real Flower simulations."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from app.run.config import CONF_DIR, compose_config, to_container
from app.run.sweep import final_scores, sweep_jobs
from app.learning.model import resolve_model
from tasks.registry import build_pool

GROUPS = ["model", "tasks", "client", "eval", "fusion"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_config_group_option_composes(group, option):
    """Choosing ``group=option`` gives exactly that file's values (read independently with OmegaConf)."""
    cfg = compose_config("", [f"{group}={option}"])
    expected = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)
    expected.pop("defaults", None)
    assert expected, f"{group}/{option}.yaml sets nothing"
    assert OmegaConf.to_container(cfg[group], resolve=False) == expected


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_documents_its_command(experiment):
    cfg = compose_config(experiment)
    head = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[:4]
    assert any(f"experiment={experiment}" in line for line in head), "first lines must give the command"
    assert cfg.rounds >= 1


@pytest.mark.parametrize("experiment", ["quick", "tiny_sweep"])
def test_tiny_experiments_instantiate(experiment, cache_dir):
    cfg = compose_config(experiment, [f"model.cache_dir={cache_dir}"])
    pool = build_pool(to_container(cfg, "tasks"))
    assert sum(e["role"] == "heldout" for e in pool) >= 1
    assert Path(resolve_model(to_container(cfg, "model")), "config.json").exists()


def test_shared_data_pool_resolves_local_directories():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    cfg = compose_config("realdata", [f"tasks.data_root={SHARED_DATA}"])
    pool = build_pool(to_container(cfg, "tasks"))
    assert len([e for e in pool if e["role"] == "heldout"]) >= 6
    assert all(Path(e["path"]).is_dir() for e in pool)


def _sweep(tmp_path, *overrides):
    return subprocess.run(
        [str(Path(sys.executable).parent / "coldfusion-sweep"), "-m", "experiment=tiny_sweep",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", f"model.cache_dir={tmp_path / 'cache'}", *overrides],
        capture_output=True, text=True,  # no wall-clock limit: the sweep ends by itself (run timeouts)
    )


def _rows(tmp_path):
    with open(tmp_path / "sweep" / "summary.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_a_two_job_sweep_runs_two_real_simulations_and_summarises_them(tmp_path):
    done = _sweep(tmp_path, "seed=0,1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert all(float(r["unseen"]) > 0 and r["best_dev_round"] and r["best_dev_round_unseen"] for r in rows)
    for job in ("0", "1"):
        assert list((tmp_path / "sweep" / job).glob("*-run*/model/config.json")), "job outputs stay in its dir"
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "## Over seeds" in summary and "± " in summary
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 1000


def test_a_sweep_with_an_invalid_job_stops_before_any_job_runs(tmp_path):
    # rounds=1 alone would run; the second job's value is refused while composing, before the first starts.
    done = _sweep(tmp_path, "rounds=1,abc", "seed=0,1")
    assert done.returncode == 2
    assert "rounds=abc seed=0]: config key 'rounds' must be int, got 'abc'" in done.stderr
    assert not (tmp_path / "sweep").exists()  # no job ran, nothing half-written


def test_sweep_jobs_are_expanded_like_hydra_does():
    assert sweep_jobs(["-m", "experiment=tiny_sweep", "seed=0,1", "hydra.sweep.dir=/x", "rounds=2"]) == [
        ["experiment=tiny_sweep", "seed=0", "rounds=2"], ["experiment=tiny_sweep", "seed=1", "rounds=2"]]


def test_the_best_round_of_a_job_is_chosen_on_dev_rows_and_reports_its_test_score():
    from strategies.records import RoundRecord

    def scored(round_, test, dev, **fields):
        record = RoundRecord(round_, roles={"a": "contributing", "u": "heldout"}, **fields)
        record.scores = {"probe": {t: {"accuracy": test, "dev_accuracy": dev} for t in record.roles}}
        record.summarise_scores(set())
        return record

    # test peaks at round 1, dev at round 2; round 3's dev is higher still, but it was rolled back
    records = [scored(0, 0.5, 0.5), scored(1, 0.9, 0.55, base_round=1), scored(2, 0.6, 0.7, base_round=2),
               scored(3, 0.99, 0.99, rolled_back=True, base_round=2)]
    row = final_scores(records)
    assert row["best_dev_round"] == 2 and row["best_dev_round_unseen"] == 0.6  # not round 1's test peak (0.9)
    assert row["unseen"] == 0.6 and row["seen"] == 0.6  # the saved model: round 2's base
    old = [RoundRecord(0, roles={"u": "heldout"}, probe={"u": 0.5}, probe_heldout=0.5)]  # schema 3: test only
    assert "best_dev_round" not in final_scores(old)


@pytest.mark.parametrize("overrides, message", [
    (["backtrack.monitor=heldout"], "config key 'backtrack.monitor' has invalid value 'heldout': held-out (unseen) "
                                    "tasks must not steer training"),
    (["eval.probe.max_dev_examples=0"], "config key 'eval.probe.max_dev_examples' has invalid value 0: must be >= 1"),
    (["eval.finetune.dev_fraction=1.5"], "config key 'eval.finetune.dev_fraction' has invalid value 1.5: must be in (0, 1)"),
])
def test_decisions_on_held_out_tasks_and_empty_dev_splits_are_refused_at_config_time(overrides, message):
    from app.run.config import ConfigError
    from app.run.sweep import check_jobs

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config("", overrides)
    with pytest.raises(ConfigError, match=re.escape(f"sweep job [{overrides[0]}]: {message}")):
        check_jobs(["-m", overrides[0]])  # a sweep stops before its first job (exit 2)
