"""``coldfusion-sim``: run a ColD Fusion simulation through a real, private Flower SuperLink.

    coldfusion-sim                               # the default: 35 virtual clients, tiny model, 10 rounds
    coldfusion-sim experiment=quick rounds=2     # any Hydra override of conf/

What it does, so nothing is left behind:

1. composes ``conf/`` with the overrides (a bad key fails here, before anything starts);
2. builds the model once (the tiny model is cached) so the virtual clients find it ready;
3. starts its **own** ``flower-superlink --simulation`` on a free loopback port, with a private
   ``FLWR_HOME`` and runtime dependency installation disabled (the app runs in this environment; Flower
   would otherwise ``uv sync`` a fresh one, and fetch a CUDA torch);
4. ``flwr run . <connection> --stream`` with one SuperNode per task, then checks the run's final status
   with ``flwr ls`` (``flwr run`` exits 0 even when the ServerApp failed);
5. prints the round-by-round table and stops the SuperLink (and its Ray workers) by process group.

Flower's own background SuperLink (``flwr run`` against the ``local`` connection starts one on port
39091 and leaves it running) is never used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
from rich.console import Console

from app.checkpoint import resume_checkpoint
from app.config import ConfigError, compose_config, to_container
from app.model import ModelLoadError, load_config, resolve_model
from app.outputs import read_metrics, summary_table
from tasks.registry import build_pool
from tasks.spec import TaskDataError

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "coldfusion-sim"
console = Console()


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
def simulation_superlink(log_path: Path) -> Iterator[dict[str, str]]:
    """A private simulation SuperLink; yields the environment for ``flwr`` commands that target it."""
    flwr_home = Path(tempfile.mkdtemp(prefix="coldfusion-flwr-"))
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flwr_env(flwr_home)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=PROJECT_DIR,
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
    """SIGTERM the whole process group (SuperLink, ServerApp, simulation, Ray), then SIGKILL."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)  # stragglers in the group (Ray workers) die too
    process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def submit_run(env: dict[str, str], run_config: dict[str, str], federation_config: str | None,
               workdir: Path, connection: str = CONNECTION) -> tuple[int, str]:
    """``flwr run --stream``; stream its output and return (run id, final status).

    ``federation_config`` sizes a simulation; pass None for a deployment connection.
    """
    config_file = workdir / "run-config.toml"
    config_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    command = ["flwr", "run", str(PROJECT_DIR), connection, "--stream", "--run-config", str(config_file)]
    if federation_config is not None:
        command += ["--federation-config", federation_config]
    run_id = None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=PROJECT_DIR) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = re.search(r"run (?:ID )?(\d{3,})", line, re.IGNORECASE)
            if run_id is None and match:
                run_id = int(match.group(1))
    if run_id is None:
        raise RuntimeError(f"'flwr run' did not report a run id (exit code {proc.returncode})")
    return run_id, run_status(env, run_id, connection)


def run_status(env: dict[str, str], run_id: int, connection: str = CONNECTION) -> str:
    out = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, cwd=PROJECT_DIR)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"


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
    num_nodes = int(cfg.federation.expected_nodes or len(pool))
    # Build (tiny) and check the model once, before the clients ask for it: a path that does not
    # load fails here, with its name, not in 35 clients.
    load_config(resolve_model(to_container(cfg, "model")))
    output_root = (output_root or PROJECT_DIR / "outputs").resolve()
    output_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="launch-", dir=output_root))
    console.print(f"[bold]ColD Fusion[/bold]: {num_nodes} virtual clients, {cfg.rounds} rounds, "
                  f"{cfg.contributors_per_round} contributors/round, model={cfg.model.name_or_path}")
    run_config = {"experiment": experiment, "overrides": " ".join(overrides), "output-dir": str(output_root)}
    federation_config = f"num-supernodes={num_nodes} client-resources-num-cpus={cpus_per_client}"
    with simulation_superlink(workdir / "superlink.log") as env:
        run_id, status = submit_run(env, run_config, federation_config, workdir)
    if cfg.resume:
        return status, Path(str(cfg.resume)).resolve()
    run_dirs = sorted(output_root.glob(f"*-run{run_id}"))
    return status, (run_dirs[-1] if run_dirs else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coldfusion-sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. rounds=3 experiment=quick")
    parser.add_argument("--output-dir", type=Path, default=None, help="where runs are written (default: ./outputs)")
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
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        console.print(summary_table(read_metrics(run_dir)))
    ok = status == "finished:completed"
    console.print(f"run status: [{'green' if ok else 'red'}]{status}[/]; outputs: {run_dir}")
    if ok and run_dir is not None:
        console.print(f"fused model: {run_dir / 'model'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
