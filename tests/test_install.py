"""Installed like a user: a plain (non-editable) ``pip install .`` works from any directory.

The slow test builds and installs the project with pip into a throwaway ``--target`` directory (offline: no
index, no build isolation, no dependencies: they are this environment's) and runs ``coldfusion-sim`` there,
from another working directory, against a real private SuperLink. The fast tests check the pieces: the
Flower app the launcher materialises for an installed copy, and that it states what pyproject.toml states.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import app.run.superlink as superlink

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: flwr depends on tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_materialised_app_states_what_pyproject_toml_states():
    ours = tomllib.loads(superlink.FLOWER_APP_TOML.format(version="0.1.0"))
    theirs = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert ours["tool"]["flwr"] == theirs["tool"]["flwr"], "FLOWER_APP_TOML (app/run/superlink.py) != pyproject.toml"
    for key in ("name", "version", "description", "license"):
        assert ours["project"][key] == theirs["project"][key], key


def test_an_installed_copy_submits_a_materialised_flower_app(monkeypatch):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    monkeypatch.setattr(superlink, "IN_CHECKOUT", False)  # as after `pip install .`
    with superlink.flower_app_dir() as app_dir:
        assert app_dir != superlink.PROJECT_DIR
        config, warnings = load_and_validate(app_dir / "pyproject.toml")
        assert config is not None and not warnings
        assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == "app.server_app:app"
        for package in superlink.APP_PACKAGES:
            assert (app_dir / package / "__init__.py").is_file()
        assert not list(app_dir.rglob("__pycache__"))
        assert len(build_fab_from_disk(app_dir)) > 0  # what `flwr run <app_dir>` builds
    assert not app_dir.exists()  # removed once submitted


def _source_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and unignored): the build writes into its tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build",
                                                                  "dist", "*.egg-info", "__pycache__"))
        return dest
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_pip_install_then_coldfusion_sim_from_another_directory(tmp_path, cache_dir, tiny_path):
    source, target, elsewhere = _source_copy(tmp_path / "source"), tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--target", str(target), str(source)],
                          capture_output=True, text=True, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (target / "app" / "conf" / "config.yaml").is_file() and (target / "deploy" / "__main__.py").is_file()
    assert not (target / "conf").exists()  # conf ships inside the app package, not as a top-level name

    # The installed copy, not this checkout: PYTHONPATH comes before the editable install's finder.
    env = {**os.environ, "PYTHONPATH": str(target), "COLDFUSION_CACHE": str(cache_dir)}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u, app.run.config; print(u.find_spec("
                            "'app.run.launch').origin, app.run.config.CONF_DIR, u.find_spec('deploy.tooling').origin)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere)
    assert probe.stdout.split() == [str(target / "app" / "run" / "launch.py"), str(target / "app" / "conf"),
                                    str(target / "deploy" / "tooling.py")], probe.stderr

    # Five synthetic tasks, one round of two contributors, two steps each: the whole path, in seconds.
    small = ["experiment=quick", "rounds=1", "contributors_per_round=2", "client.max_steps=2", "tasks.num_tasks=5",
             "tasks.num_heldout=1", "tasks.train_size=60", "tasks.test_size=40", "eval.probe.max_train_examples=60",
             "eval.probe.max_test_examples=40"]
    run = subprocess.run([str(target / "bin" / "coldfusion-sim"), *small], capture_output=True, text=True, env=env,
                         cwd=elsewhere, timeout=540)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "run status: finished:completed" in run.stdout and "fused model:" in run.stdout  # found by its run id
    runs = list((elsewhere / "outputs").glob("*-run*"))  # ./outputs of the directory it ran from
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").is_file() and (runs[0] / "model" / "config.json").is_file()
    assert not (target / "outputs").exists()
