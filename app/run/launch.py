"""``coldfusion-sim``: run a ColD Fusion simulation through a real, private Flower SuperLink.

    coldfusion-sim                               # the default: 35 virtual clients, tiny model, 10 rounds
    coldfusion-sim experiment=quick rounds=2     # any Hydra override of conf/

What it does, so nothing is left behind:

1. composes ``conf/`` with the overrides (a bad key fails here, before anything starts);
2. resolves the task pool and checks it before anything starts: ``min_contributions`` must not exceed
   the pool's contributing tasks, and every local dataset of the pool is loaded once (which validates
   it: ``meta.json`` keys, columns, labels); any problem exits 2 with its message;
3. builds the model once (the tiny model is cached) so the virtual clients find it ready;
4. starts its **own** ``flower-superlink --simulation`` on a free loopback port, with a private
   ``FLWR_HOME`` and runtime dependency installation disabled (the app runs in this environment; Flower
   would otherwise ``uv sync`` a fresh one, and fetch a CUDA torch);
5. submits the run with ``flwr run <app> <connection> --format json`` (the run id comes from Flower's
   JSON answer), streams the ServerApp's log with ``flwr log <run-id> <connection> --stream``, then checks
   the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when the ServerApp failed). The whole
   run is bounded by ``federation.run_timeout_s`` (:func:`run_timeout`): past it the run is stopped with
   ``flwr stop`` and :class:`RunTimeoutError` names the key (exit 1);
6. prints the round-by-round table and stops the SuperLink by process group, with the groups of its
   descendants (Flower starts the simulation and Ray in a session of their own).

Flower's own background SuperLink (``flwr run`` against the ``local`` connection starts one on port
39091 and leaves it running) is never used.

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

import argparse
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

from app.run.checkpoint import resume_checkpoint
from app.site.faults import ALLOW_ENV
from app.run.config import ConfigError, compose_config, to_container
from app.learning.model import ModelLoadError, load_config, resolve_model
from app.run.outputs import read_metrics, summary_table
from tasks.registry import build_pool, load_task
from tasks.spec import TaskDataError

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


@contextmanager
def simulation_superlink(log_path: Path, allow_faults: bool = False) -> Iterator[dict[str, str]]:
    """A private simulation SuperLink; yields the environment for ``flwr`` commands that target it.

    ``allow_faults``: the virtual clients (this SuperLink's Ray workers inherit its environment) opt in
    to the fault-injection testing aid (``app.site.faults``), as a real site does with ``allow-faults=true``.
    """
    flwr_home = Path(tempfile.mkdtemp(prefix="coldfusion-flwr-"))
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flwr_env(flwr_home)
    if allow_faults:
        env[ALLOW_ENV] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=working_dir(),
        )
    try:
        wait_healthy(port, process, log_path)
        yield env
    finally:
        stop_process_group(process)
        shutil.rmtree(flwr_home, ignore_errors=True)  # the installed app copy and Flower's state


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


def check_pool(cfg: DictConfig, pool: list[dict]) -> None:
    """Before anything starts: the pool can fuse at all, and every local dataset of it loads and validates."""
    contributing = sum(entry["role"] == "contributing" for entry in pool)
    if int(cfg.min_contributions) > contributing:
        source = ("tasks.contributing" if cfg.tasks.get("kind") == "catalog"
                  else f"tasks.num_tasks={cfg.tasks.get('num_tasks')} less the held-out ones")
        raise ConfigError(
            f"config key 'min_contributions' is {cfg.min_contributions}, above the {contributing} contributing "
            f"task(s) of the pool ({source}): no round could ever fuse; lower min_contributions or add tasks")
    local = [entry for entry in pool if entry.get("source") == "local"]
    if local:
        console.print(f"checking the pool's {len(local)} local dataset(s)")
    for entry in local:
        load_task(entry)  # TaskDataError naming the file, key, row and value


def run_simulation(overrides: list[str], experiment: str = "", output_root: Path | None = None,
                   cpus_per_client: int = 1) -> tuple[str, Path | None]:
    """Compose, launch, wait; return (final status, the run's output directory)."""
    cfg = compose_config(experiment, overrides)
    if cfg.tasks.get("data_root") and not Path(str(cfg.tasks.data_root)).is_absolute():
        # The ServerApp runs in the SuperLink's working directory: hand it the path meant here.
        overrides = [*overrides, f"tasks.data_root={Path(str(cfg.tasks.data_root)).resolve()}"]
        cfg = compose_config(experiment, overrides)  # exactly what the ServerApp will compose
    if cfg.resume:  # fail here, with the differing keys named, rather than in the ServerApp
        resume_checkpoint(cfg.resume, to_container(cfg), bool(cfg.resume_allow_config_change))
    pool = build_pool(to_container(cfg, "tasks"))
    check_pool(cfg, pool)
    num_nodes = int(cfg.federation.expected_nodes or len(pool))
    # Build (tiny) and check the model once, before the clients ask for it: a path that does not
    # load fails here, with its name, not in 35 clients.
    load_config(resolve_model(to_container(cfg, "model")))
    output_root = (output_root or default_output_root()).resolve()
    output_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="launch-", dir=output_root))
    console.print(f"[bold]ColD Fusion[/bold]: {num_nodes} virtual clients, {cfg.rounds} rounds, "
                  f"{cfg.contributors_per_round} contributors/round, model={cfg.model.name_or_path}")
    run_config = {"experiment": experiment, "overrides": " ".join(overrides), "output-dir": str(output_root)}
    federation_config = f"num-supernodes={num_nodes} client-resources-num-cpus={cpus_per_client}"
    with simulation_superlink(workdir / "superlink.log", allow_faults=bool(cfg.faults.enabled)) as env:
        run_id, status = submit_run(env, run_config, federation_config, workdir, timeout_s=run_timeout(cfg))
    if cfg.resume:
        return status, Path(str(cfg.resume)).resolve()
    run_dirs = sorted(output_root.glob(f"*-run{run_id}"))
    return status, (run_dirs[-1] if run_dirs else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coldfusion-sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. rounds=3 experiment=quick")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where runs are written (default: outputs/ of the checkout, else ./outputs)")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs per virtual client (on 2 cores, 1 runs two clients at a time)")
    args = parser.parse_args(argv)
    experiment = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("experiment=")), "")
    overrides = [o for o in args.overrides if not o.startswith("experiment=")]
    # SIGTERM (a scheduler, a test, `kill PID`) unwinds like Ctrl-C, so the SuperLink is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        status, run_dir = run_simulation(overrides, experiment, args.output_dir, args.cpus_per_client)
    except (ConfigError, TaskDataError, ModelLoadError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RunTimeoutError as exc:  # the SuperLink has been stopped by now
        console.print(f"[red]error:[/red] {exc}")
        return 1
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        console.print(summary_table(read_metrics(run_dir)))
    ok = status == "finished:completed"
    console.print(f"run status: [{'green' if ok else 'red'}]{status}[/]; outputs: {run_dir}")
    if ok and run_dir is not None:
        console.print(f"fused model: {run_dir / 'model'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
