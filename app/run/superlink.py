"""Driving Flower's own processes and command line: a SuperLink's health and shutdown, and a run's
submission, log and status (``flwr run``, ``flwr log``, ``flwr ls``, ``flwr stop``).

Used by the launcher (``app.run.launch``) and by the deployment tools (``deploy``).

**Checkout or installed.** ``flwr run`` needs a Flower app directory: a ``pyproject.toml`` with the
``[tool.flwr.app]`` tables next to the app's packages. In a checkout (and an editable install) that is
the repository itself, exactly as ``flwr run .`` uses it. After a plain ``pip install .`` the packages
live in site-packages, which is no app directory; :func:`flower_app_dir` then materialises one in a
temporary directory for each submission: a ``pyproject.toml`` holding the project's name and version and
the ``[tool.flwr.app]`` tables (:data:`FLOWER_APP_TOML`, kept equal to pyproject.toml's by
``tests/test_install.py``) plus copies of the installed ``app`` (with ``app/conf``, the configuration
shipped as package data), ``strategies`` and ``tasks`` packages; nothing else is honoured. This keeps
one code path (``flwr run <dir>``), needs no build step and nothing shipped twice; the app bundle Flower
builds from it is the installed code, byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
from omegaconf import DictConfig
from rich.console import Console

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONNECTION = "coldfusion-sim"
RUN_TIMEOUT_SLACK_S = 600  # added to the derived run timeout: Ray start, model save, report, checkpoints
console = Console()

# The Flower app of an installed copy (see the module docstring): pyproject.toml's [project] identity and its
# [tool.flwr.app] tables, verbatim (tests/test_install.py checks they are equal). No dependencies: the SuperLink
# runs with runtime dependency installation disabled, in this environment.
FLOWER_APP_TOML = """\
[project]
name = "coldfusion-flower"
version = "{version}"
description = "ColD Fusion (collaborative multitask finetuning) as a Flower federated learning app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "coldfusion"

[tool.flwr.app.components]
serverapp = "app.server_app:app"
clientapp = "app.client_app:app"

[tool.flwr.app.config]
experiment = ""
overrides = ""
output-dir = "outputs"
"""
APP_PACKAGES = ("app", "strategies", "tasks")  # what the ServerApp and the ClientApp import


def is_flower_app(directory: Path) -> bool:
    """A directory ``flwr run`` accepts: a pyproject.toml with a ``[tool.flwr.app]`` table."""
    try:
        return "[tool.flwr.app]" in (directory / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False


IN_CHECKOUT = is_flower_app(PROJECT_DIR)  # False after a plain `pip install .` (PROJECT_DIR is site-packages)


def working_dir() -> Path:
    """Where the SuperLink runs and relative paths are meant: the checkout, or the caller's directory."""
    return PROJECT_DIR if IN_CHECKOUT else Path.cwd()


def default_output_root() -> Path:
    return working_dir() / "outputs"


@contextmanager
def flower_app_dir() -> Iterator[Path]:
    """The directory to hand ``flwr run``: the checkout, or a materialised copy of the installed app."""
    if IN_CHECKOUT:
        yield PROJECT_DIR
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        project_version = version("coldfusion-flower")
    except PackageNotFoundError:
        project_version = "0.1.0"
    app_dir = Path(tempfile.mkdtemp(prefix="coldfusion-app-"))
    try:
        (app_dir / "pyproject.toml").write_text(FLOWER_APP_TOML.format(version=project_version), encoding="utf-8")
        for package in APP_PACKAGES:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(f"package '{package}' of the Flower app is not installed")
            shutil.copytree(list(spec.submodule_search_locations)[0], app_dir / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield app_dir
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # flwr launches its helpers (flower-superlink, flwr-serverapp, ...) by name
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_healthy(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0,
                 ca_cert: Path | None = None) -> None:
    """Poll the SuperLink's ``/health`` (over TLS, verified against ``ca_cert``, when one is given)."""
    url = f"{'https' if ca_cert else 'http'}://127.0.0.1:{port}/health"
    verify = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=0.5, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy on port {port} after {timeout:.0f}s; see {log_path}")


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's group and its descendants' groups, wait up to ``grace``, then SIGKILL them all.

    Flower starts its SuperExec in a session of its own (``start_new_session``), so the simulation, its
    ServerApp and Ray live in a group of their own; without this they would outlive the launcher by many
    seconds (until their parent-death monitors notice), or for good when killed mid-run.
    """
    deadline = time.monotonic() + grace
    groups = {process.pid} | (_descendant_groups(process.pid) - {os.getpgrp()})
    if process.poll() is None or len(groups) > 1:
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        while _live_groups(groups - {process.pid}) and time.monotonic() < deadline:
            time.sleep(0.2)  # the simulation shuts Ray down on SIGTERM
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)  # stragglers (Ray workers) die too
    process.wait()


def _proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, state) of every process, from /proc (empty where there is none)."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table.append((int(stat.parent.name), int(fields[1]), int(fields[2]), fields[0]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendant_groups(pid: int) -> set[int]:
    children: dict[int, list[tuple[int, int]]] = {}
    for child, ppid, pgid, _state in _proc_table():
        children.setdefault(ppid, []).append((child, pgid))
    groups, todo = set(), [pid]
    while todo:
        for child, pgid in children.get(todo.pop(), []):
            groups.add(pgid)
            todo.append(child)
    return groups


def _live_groups(groups: set[int]) -> set[int]:
    return {pgid for _pid, _ppid, pgid, state in _proc_table() if pgid in groups and state not in ("Z", "X")}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RunTimeoutError(RuntimeError):
    """The run did not finish within ``federation.run_timeout_s``; it was stopped. The message says so."""

    def __init__(self, message: str, run_id: int | None = None):
        super().__init__(message)
        self.run_id = run_id  # None: the submission itself did not answer in time


def run_timeout(cfg: DictConfig) -> float:
    """``federation.run_timeout_s``, or when null the longest a healthy run can take by its own timeouts:
    node wait + discovery + (rounds + 1) x (train + eval) + RUN_TIMEOUT_SLACK_S (round 0 evaluates only)."""
    fed = cfg.federation
    if fed.get("run_timeout_s") is not None:
        return float(fed.run_timeout_s)
    return (float(fed.node_wait_timeout_s) + float(fed.discovery_timeout_s)
            + (int(cfg.rounds) + 1) * (float(fed.train_timeout_s) + float(fed.eval_timeout_s)) + RUN_TIMEOUT_SLACK_S)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _flwr_json(command: list[str], env: dict[str, str], timeout: float | None) -> dict:
    """Run a ``flwr ... --format json`` command; its JSON answer, or a failure with whatever it printed."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=working_dir())
    text = done.stdout
    try:
        return json.loads(text[text.index("{"):text.rindex("}") + 1])
    except ValueError:
        return {"success": False, "error-message": (done.stderr or text).strip() or f"exit code {done.returncode}"}


def _forward(stream) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()


def submit_run(env: dict[str, str], run_config: dict[str, str], federation_config: str | None,
               workdir: Path, connection: str = CONNECTION, timeout_s: float | None = None) -> tuple[int, str]:
    """Submit the run, stream its log to stdout, wait for it; return (run id, final status).

    ``federation_config`` sizes a simulation; pass None for a deployment connection. ``timeout_s``
    (``federation.run_timeout_s``, see :func:`run_timeout`) bounds the whole run, submission included: past it
    the run is stopped (``flwr stop``) and :class:`RunTimeoutError` is raised. None waits for as long as it takes.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    config_file = workdir / "run-config.toml"
    config_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    key = "federation.run_timeout_s" if timeout_s is None else f"federation.run_timeout_s={timeout_s:g}s"
    with flower_app_dir() as app_dir:
        command = ["flwr", "run", str(app_dir), connection, "--format", "json", "--run-config", str(config_file)]
        if federation_config is not None:
            command += ["--federation-config", federation_config]
        try:
            answer = _flwr_json(command, env, _remaining(deadline))
        except subprocess.TimeoutExpired:
            raise RunTimeoutError(f"'flwr run' did not submit the run within {key}: is the SuperLink "
                                  f"({connection}) answering? Raise federation.run_timeout_s if it is slow") from None
    if not answer.get("success") or answer.get("run-id") is None:
        raise RuntimeError(f"'flwr run' did not start the run: {answer.get('error-message', answer)}")
    run_id = int(answer["run-id"])
    console.print(f"run {run_id} submitted; its log follows"
                  + (f" (the run is stopped after {key})" if timeout_s is not None else ""))
    # The ServerApp's log, for the user; `flwr log --stream` ends when the run finishes.
    streamer = subprocess.Popen(["flwr", "log", str(run_id), connection, "--stream"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=working_dir())
    forwarder = threading.Thread(target=_forward, args=(streamer.stdout,), daemon=True)
    forwarder.start()
    try:
        try:
            streamer.wait(timeout=_remaining(deadline))
            forwarder.join(timeout=10)
            status = run_status(env, run_id, connection, timeout=_remaining(deadline))
            while not status.startswith("finished") and (deadline is None or time.monotonic() < deadline):
                time.sleep(5)  # the log stream ended early (a dropped connection): poll the status instead
                status = run_status(env, run_id, connection, timeout=_remaining(deadline))
            if status.startswith("finished"):
                return run_id, status
        except subprocess.TimeoutExpired:
            pass
        stopped = stop_run(env, run_id, connection)
        outcome = "stopped" if stopped else "abandoned (flwr stop failed)"
        raise RunTimeoutError(
            f"run {run_id} did not finish within {key} and was {outcome}. Raise federation.run_timeout_s (null "
            "derives it from federation.node_wait_timeout_s, discovery_timeout_s, train_timeout_s, eval_timeout_s "
            "and rounds), or look for what hangs in the SuperLink's log", run_id)
    finally:
        if streamer.poll() is None:
            streamer.kill()
            streamer.wait()
        forwarder.join(timeout=5)  # the last lines of the log before any error is printed


def stop_run(env: dict[str, str], run_id: int, connection: str = CONNECTION, timeout: float = 30.0) -> bool:
    """``flwr stop``: True if the SuperLink accepted it (a hung SuperLink may not answer at all)."""
    try:
        answer = _flwr_json(["flwr", "stop", str(run_id), connection, "--format", "json"], env, timeout)
    except subprocess.TimeoutExpired:
        return False
    return bool(answer.get("success"))


def run_status(env: dict[str, str], run_id: int, connection: str = CONNECTION, timeout: float | None = 120.0) -> str:
    try:
        out = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
                             env=env, capture_output=True, text=True, cwd=working_dir(),
                             timeout=None if timeout is None else max(timeout, 30.0))
    except subprocess.TimeoutExpired:
        return "unknown (flwr ls did not answer)"
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"
