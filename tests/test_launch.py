"""The launcher (app/run/launch.py): bad input fails before anything starts; a run past its timeout is stopped.

The bad-input tests are fast: they must fail before any Flower process exists (``simulation_superlink`` is
replaced by a tripwire). The run timeout is tested against a stand-in ``flwr`` that never answers (fast), and
against a real private SuperLink with a run that cannot finish in time (slow): stopped, and nothing left running.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import app.run.launch as launch
import app.run.superlink as superlink
from app.run.config import compose_config
from app.run.launch import RunTimeoutError, main, run_timeout, submit_run
from app.learning.model import ModelLoadError, resolve_model
from app.run.outputs import read_metrics


@pytest.fixture()
def nothing_starts(monkeypatch):
    """Fail the test if the launcher gets as far as starting a SuperLink."""
    def tripwire(*_args, **_kwargs):
        raise AssertionError("the launcher started a SuperLink: the bad input was not caught before")
    monkeypatch.setattr(launch, "simulation_superlink", tripwire)


def write_dataset(root: Path, meta: dict, train: list[dict], test: list[dict] | None = None) -> Path:
    """A local dataset in the format of shared/data: meta.json plus train/test jsonl."""
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    for split, rows in (("train", train), ("test", test if test is not None else train)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


META = {"name": "toy", "task": "classification", "label_names": ["negative", "positive"], "sentence_pair": False}
# Words of the tiny model's vocabulary: the launcher refuses text its tokenizer reads as mostly <unk>.
ROWS = [{"text": f"gloukek gokoul vebek laglaigem {i}", "label": i % 2} for i in range(8)]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The launcher's messages unwrapped (a narrow terminal would break long paths mid-word)."""
    from rich.console import Console

    monkeypatch.setattr(launch, "console", Console(width=10_000))


def run_launcher(capsys, data_root: Path, out: Path, *overrides: str) -> tuple[int, str]:
    code = main(["tasks=shared_data", f"tasks.data_root={data_root}", "tasks.heldout=[]", *overrides,
                 "--output-dir", str(out)])
    return code, capsys.readouterr().out


def test_a_label_out_of_range_fails_before_anything_starts(tmp_path, capsys, nothing_starts):
    write_dataset(tmp_path / "data" / "good", META, ROWS)
    write_dataset(tmp_path / "data" / "toy", META, ROWS + [{"text": "one too many", "label": 5}])
    out = tmp_path / "out"
    code, text = run_launcher(capsys, tmp_path / "data", out, "tasks.contributing=[good,toy]")
    assert code == 2
    train = tmp_path / "data" / "toy" / "train.jsonl"
    assert f"error: {train}: column 'label' line 9: label 5 is outside [0, 2)" in text
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_meta_key_fails_before_anything_starts(tmp_path, capsys, nothing_starts):
    meta = {k: v for k, v in META.items() if k != "sentence_pair"}
    write_dataset(tmp_path / "data" / "toy", meta, ROWS)
    out = tmp_path / "out"
    code, text = run_launcher(capsys, tmp_path / "data", out, "tasks.contributing=[toy]")
    assert code == 2
    assert f"{tmp_path / 'data' / 'toy' / 'meta.json'}: missing key 'sentence_pair'" in text
    assert not out.exists() or not any(out.iterdir())


def test_min_contributions_above_the_contributing_tasks_fails_before_anything_starts(tmp_path, capsys,
                                                                                     nothing_starts):
    for name in ("one", "two"):
        write_dataset(tmp_path / "data" / name, {**META, "name": name}, ROWS)
    out = tmp_path / "out"
    code, text = run_launcher(capsys, tmp_path / "data", out, "tasks.contributing=[one,two]", "min_contributions=3")
    assert code == 2
    assert ("config key 'min_contributions' is 3, above the 2 contributing task(s) of the pool (tasks.contributing)"
            in text)
    assert not out.exists() or not any(out.iterdir())


def test_a_model_path_that_does_not_exist_is_named_as_such(tmp_path, capsys, nothing_starts):
    assert main(["model.name_or_path=/nonexistent", "--output-dir", str(tmp_path)]) == 2
    text = capsys.readouterr().out
    assert "model.name_or_path='/nonexistent': no such directory, and not a hub id" in text
    assert "alphanumeric" not in text
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- overrides and client.device, end to end
@pytest.mark.parametrize("overrides, message", [
    (["+roundz=3"], "unknown config key 'roundz': conf/ has no such key, and an override cannot add one (with or "
                    "without '+'); did you mean 'rounds'?"),
    (["experiment=quick", "rounds=1", "experiment=tiny_sweep"],
     "config group 'experiment' is set 2 times (experiment=quick, experiment=tiny_sweep)"),
    (["client.device=gpu"], "config key 'client.device' has invalid value 'gpu'"),
])
def test_an_unknown_key_a_second_experiment_or_a_bad_device_exits_2_before_anything_starts(
        overrides, message, tmp_path, capsys, nothing_starts):
    assert main([*overrides, "--output-dir", str(tmp_path)]) == 2
    assert f"error: {message}" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.fixture()
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA devices (the oracle of the check: set here, not read from the machine)."""
    import torch

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return see


@pytest.mark.parametrize("seen, device, message", [
    (0, "cuda", "config key 'client.device' is 'cuda', but torch sees 0 CUDA device(s) on this machine"),
    (2, "cuda:2", "config key 'client.device' is 'cuda:2', but torch sees 2 CUDA device(s) on this machine"),
])
def test_a_gpu_device_torch_cannot_see_is_refused_before_the_superlink_starts(seen, device, message, gpus, tmp_path,
                                                                           capsys, nothing_starts):
    gpus(seen)
    assert main([f"client.device={device}", "simulation.client_gpus=0.5", "--output-dir", str(tmp_path)]) == 2
    assert f"error: {message}: use client.device=auto" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_a_gpu_device_needs_ray_to_hand_the_clients_a_gpu(gpus, tmp_path, capsys, nothing_starts):
    gpus(1)
    assert main(["client.device=cuda:0", "--output-dir", str(tmp_path)]) == 2  # simulation.client_gpus=0
    assert "config key 'client.device' is 'cuda:0' with simulation.client_gpus=0: Ray hides" in capsys.readouterr().out


@pytest.mark.parametrize("seen, device", [(0, "cpu"), (0, "auto"), (1, "cuda"), (2, "cuda:1")])
def test_a_device_torch_sees_passes_the_check(seen, device, gpus):
    gpus(seen)
    launch.check_device(compose_config("", [f"client.device={device}", "simulation.client_gpus=0.25"]))


def test_the_serverapp_gets_every_override_exactly_as_the_launcher_was_given_it(tmp_path, monkeypatch, capsys):
    """A path with a space and a comma, and a dict value, survive the run config: the ServerApp's composition of
    it (app/server_app.py) equals the launcher's. Stand-ins for Flower capture the run config."""
    from app.server_app import compose_run_config

    data = tmp_path / "my data, too"
    for name in ("one", "two"):
        write_dataset(data / name, {**META, "name": name}, ROWS)
    sent = {}

    @contextmanager
    def superlink(*_args, **_kwargs):
        yield {}

    def capture(_env, run_config, *_args, **_kwargs):
        sent.update(run_config)
        return 5, "finished:completed"
    monkeypatch.setattr(launch, "simulation_superlink", superlink)
    monkeypatch.setattr(launch, "submit_run", capture)
    monkeypatch.chdir(tmp_path)  # a relative data_root: the launcher hands the ServerApp its absolute path
    # Hydra's quotes keep the comma in the value (as a shell user writes "tasks.data_root='my data, too'")
    code, text = run_launcher(capsys, "'my data, too'", tmp_path / "out", "tasks.contributing=[one,two]",
                              "faults.slow={one: 2, two: 1.5}", "rounds=1", "contributors_per_round=2")
    assert code == 0, text  # the stand-in says the run completed
    served = compose_run_config(sent)
    assert served.tasks.data_root == str(data)  # the oracle: the directory written above
    assert dict(served.faults.slow) == {"one": 2, "two": 1.5} and list(served.tasks.contributing) == ["one", "two"]
    assert served.rounds == 1 and sent["output-dir"] == str((tmp_path / "out").resolve())


@pytest.mark.slow
def test_coldfusion_sim_passes_a_path_with_a_space_and_a_dict_value_to_the_run(tmp_path, cache_dir):
    """The real CLI, as a shell runs it: the nodes load their datasets from a directory with a space, and the run
    records the dict value. rounds=0: the start model is probed on every task, which is all this needs."""
    from deploy.tooling import write_local_dataset

    data = tmp_path / "my data"
    for name, synthetic in (("alpha", "syn00_sentiment"), ("beta", "syn01_topic"), ("gamma", "syn08_same_sent")):
        write_local_dataset(data / name, synthetic, name=name, train_size=60, test_size=30)
    out = tmp_path / "out"
    command = (f"{Path(sys.executable).parent / 'coldfusion-sim'} experiment=tiny_sweep rounds=0 tasks=shared_data "
               f"tasks.data_root={shlex.quote(str(data))} 'tasks.contributing=[alpha, beta]' 'tasks.heldout=[gamma]' "
               f"'faults.slow={{alpha: 2, beta: 1.5}}' eval.probe.max_train_examples=60 --output-dir {out}")
    env = {**os.environ, "COLDFUSION_CACHE": str(cache_dir)}
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = out.glob("*-run*")
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["tasks"]["data_root"] == str(data) and written["faults"]["slow"] == {"alpha": 2, "beta": 1.5}
    (start,) = read_metrics(run_dir)
    assert set(start["probe"]) == {"alpha", "beta", "gamma"}  # every node loaded its data from the spaced path


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no-such-model", "~/no/such/model", "../nowhere"])
def test_resolve_model_refuses_a_missing_path_that_is_no_hub_id(name):
    with pytest.raises(ModelLoadError, match="no such directory, and not a hub id"):
        resolve_model({"name_or_path": name})


@pytest.mark.parametrize("name", ["roberta-base", "FacebookAI/roberta-base"])
def test_resolve_model_leaves_hub_ids_and_existing_directories_to_the_loader(name, tmp_path):
    assert resolve_model({"name_or_path": name}) == name
    assert resolve_model({"name_or_path": str(tmp_path)}) == str(tmp_path)


def test_the_run_timeout_is_derived_from_the_federation_timeouts_unless_set():
    cfg = compose_config("", ["rounds=4", "federation.node_wait_timeout_s=10", "federation.discovery_timeout_s=20",
                              "federation.train_timeout_s=30", "federation.eval_timeout_s=40"])
    assert run_timeout(cfg) == 10 + 20 + 5 * (30 + 40) + superlink.RUN_TIMEOUT_SLACK_S
    assert run_timeout(compose_config("", ["federation.run_timeout_s=77"])) == 77


# ---------------------------------------------------------------------- the run timeout, against a stand-in flwr
FAKE_FLWR = """#!/usr/bin/env bash
# A stand-in for flwr: `run` answers as flwr 1.42 does (or hangs, FAKE_HANG_RUN=1), `log` never ends (a hung
# SuperLink), `ls` says the run is running, `stop` succeeds and leaves a trace.
case "$1" in
  run) [ -n "$FAKE_HANG_RUN" ] && exec sleep 600
       printf '{\\n  "success": true,\\n  "run-id": "4242424242",\\n  "fab-id": "coldfusion/coldfusion-flower"\\n}\\n' ;;
  log) echo "INFO :      Starting logstream for run_id \\`$2\\`"; exec sleep 600 ;;
  ls) echo '{"success": true, "runs": [{"run-id": "4242424242", "status": "running"}]}' ;;
  stop) touch "$FAKE_TRACE/stopped-$2"; echo '{"success": true, "run-id": "'"$2"'"}' ;;
esac
"""


@pytest.fixture()
def fake_flwr_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    flwr = bin_dir / "flwr"
    flwr.write_text(FAKE_FLWR)
    flwr.chmod(flwr.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_TRACE": str(tmp_path)}


def test_a_run_that_does_not_finish_in_time_is_stopped_with_a_clear_error(tmp_path, fake_flwr_env, capsys):
    with pytest.raises(RunTimeoutError) as info:
        submit_run(fake_flwr_env, {"experiment": ""}, None, tmp_path, timeout_s=3)
    assert info.value.run_id == 4242424242  # Flower's JSON answer, not a pattern in its log
    assert "run 4242424242 did not finish within federation.run_timeout_s=3s and was stopped" in str(info.value)
    assert (tmp_path / "stopped-4242424242").exists()  # flwr stop was called for that run
    assert "Starting logstream for run_id `4242424242`" in capsys.readouterr().out  # the log reached the user


def test_a_superlink_that_never_answers_the_submission_ends_with_a_clear_error(tmp_path, fake_flwr_env):
    with pytest.raises(RunTimeoutError, match=r"'flwr run' did not submit the run within federation.run_timeout_s=2s"):
        submit_run({**fake_flwr_env, "FAKE_HANG_RUN": "1"}, {"experiment": ""}, None, tmp_path, timeout_s=2)


def test_coldfusion_sim_exits_1_with_the_message_when_the_run_times_out(monkeypatch, capsys):
    def times_out(*_args, **_kwargs):
        raise RunTimeoutError("run 7 did not finish within federation.run_timeout_s=5s and was stopped", 7)
    monkeypatch.setattr(launch, "run_simulation", times_out)
    assert main(["rounds=1"]) == 1
    assert "error: run 7 did not finish within federation.run_timeout_s=5s and was stopped" in capsys.readouterr().out


# ---------------------------------------------------------------------- the run timeout, real Flower
@pytest.mark.slow
def test_a_run_that_cannot_finish_is_stopped_at_its_timeout_and_nothing_is_left_running(tmp_path):
    # The ServerApp waits (up to 600 s) for 3 nodes, and the simulation has 2: the run cannot finish in 30 s.
    run_config = {"experiment": "tiny_sweep", "output-dir": str(tmp_path),
                  "overrides": "federation.expected_nodes=3 federation.node_wait_timeout_s=600"}
    with launch.simulation_superlink(tmp_path / "superlink.log") as env:
        address = (Path(env["FLWR_HOME"]) / "config.toml").read_text().split('address = "')[1].split('"')[0]
        with pytest.raises(RunTimeoutError, match=r"did not finish within federation.run_timeout_s=30s and was "
                                                  r"stopped\. Raise federation.run_timeout_s") as info:
            submit_run(env, run_config, "num-supernodes=2 client-resources-num-cpus=1", tmp_path, timeout_s=30)
        assert info.value.run_id is not None
        assert superlink.run_status(env, info.value.run_id) == "finished:stopped"
    # The SuperLink, and the SuperExec and simulation Flower starts in a session of its own: all gone.
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if address.encode() in _reads(p)]
    assert not left, [_reads(p) for p in left]


def _reads(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
