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

The Flower processes and commands are driven by ``app.run.superlink`` (which also says how an
installed copy, without a checkout, becomes a Flower app directory).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from hydra.core.override_parser.types import Quote, QuotedString
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from app.run.checkpoint import resume_checkpoint
from app.run.config import (
    ConfigError,
    compose_config,
    encode_overrides,
    pop_experiment,
    to_container,
    validate_config,
)
from app.report import summary_table
from app.report.markdown import never_scored_lines
from app.run.outputs import OutputDirError, read_round_records, writable_dir
from app.run.superlink import (
    CONNECTION,
    RunTimeoutError,
    default_output_root,
    flwr_env,
    free_port,
    run_timeout,
    stop_process_group,
    submit_run,
    wait_healthy,
    working_dir,
)
from app.learning.model import ModelLoadError, load_config, load_tokenizer, resolve_model
from app.site.faults import ALLOW_ENV
from tasks.registry import build_pool, load_task
from tasks.spec import TaskDataError
from tasks.tokenize import check_known_tokens, unknown_fraction

console = Console()


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


def check_pool(cfg: DictConfig, pool: list[dict]) -> None:
    """Before anything starts: the pool can fuse at all, and every local dataset of it loads and validates (read as
    the nodes read it) and is readable by the model's tokenizer (``tasks.max_unknown_fraction``)."""
    contributing = sum(entry["role"] == "contributing" for entry in pool)
    if int(cfg.min_contributions) > contributing:
        source = ("tasks.contributing" if cfg.tasks.get("kind") == "catalog"
                  else f"tasks.num_tasks={cfg.tasks.get('num_tasks')} less the held-out ones")
        raise ConfigError(
            f"config key 'min_contributions' is {cfg.min_contributions}, above the {contributing} contributing "
            f"task(s) of the pool ({source}): no round could ever fuse; lower min_contributions or add tasks")
    local = [entry for entry in pool if entry.get("source") == "local"]
    tokenizer = None  # loaded once, for the first local dataset
    if local:
        console.print(f"checking the pool's {len(local)} local dataset(s)")
    fractions = {}
    for entry in local:
        _, data = load_task(entry)  # TaskDataError naming the file, line, key and value
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model(to_container(cfg, "model")))
        fractions[entry["name"]] = unknown_fraction(data, tokenizer)
    # after every dataset loaded (data errors first), one message naming every task the tokenizer cannot read
    check_known_tokens(fractions, cfg.tasks.get("max_unknown_fraction"), str(cfg.model.name_or_path))
    known = {name: f for name, f in fractions.items() if f is not None}
    if known:
        worst = max(known, key=known.get)
        console.print(f"unknown tokens: at most {known[worst]:.1%} of a dataset's ({worst}); "
                      f"limit tasks.max_unknown_fraction={cfg.tasks.get('max_unknown_fraction')}")


def hydra_quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value: a path with spaces, commas, quotes or brackets stays one string."""
    return QuotedString(text=value, quote=Quote.single).with_quotes()


def check_device(cfg: DictConfig) -> None:
    """A GPU ``client.device`` that the virtual clients could not use, refused before anything starts: torch must
    see that device here, and Ray must hand the clients a share of a GPU (it hides the GPUs from one that
    reserves none). ``auto`` takes a GPU where a client sees one, else the CPU."""
    device = str(cfg.client.device)
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"config key 'client.device' is {device!r}, but torch sees {count} CUDA device(s) on "
                              "this machine: use client.device=auto (a GPU where there is one) or cpu")
        if float(cfg.simulation.client_gpus) <= 0:
            raise ConfigError(f"config key 'client.device' is {device!r} with simulation.client_gpus=0: Ray hides "
                              "the GPUs from a virtual client that reserves none; set simulation.client_gpus "
                              "(e.g. 0.25: four clients per GPU)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'client.device' is 'mps', but torch sees no MPS device on this machine: "
                          "use client.device=auto or cpu")


def federation_config(cfg: DictConfig, num_nodes: int) -> str:
    """Flower's ``--federation-config`` for a simulation: the virtual clients, what Ray reserves for each
    (``simulation.client_cpus``, ``simulation.client_gpus``; Ray hides the GPUs from a client that reserves none)
    and, when set, how many CPUs Ray may hand out (``simulation.ray_cpus``)."""
    settings = (f"num-supernodes={num_nodes} client-resources-num-cpus={int(cfg.simulation.client_cpus)} "
                f"client-resources-num-gpus={float(cfg.simulation.client_gpus)}")
    if cfg.simulation.ray_cpus is not None:  # Ray's own view of the machine (its init arguments)
        settings += f" init-args-num-cpus={int(cfg.simulation.ray_cpus)}"
    return settings


def run_simulation(overrides: list[str], experiment: str = "", output_root: Path | None = None,
                   cfg: DictConfig | None = None) -> tuple[str, Path | None]:
    """Compose, launch, wait; return (final status, the run's output directory).

    ``cfg``: the configuration already composed from ``experiment`` and ``overrides`` (a sweep job's), checked
    here instead of composed again. The ServerApp composes the same overrides in its own process.
    """
    cfg = compose_config(experiment, overrides) if cfg is None else validate_config(cfg)
    data_root = cfg.tasks.get("data_root")
    if data_root and not Path(str(data_root)).is_absolute():
        # The ServerApp runs in the SuperLink's working directory: hand it the path meant here.
        cfg.tasks.data_root = str(Path(str(data_root)).resolve())
        overrides = [*overrides, f"tasks.data_root={hydra_quoted(cfg.tasks.data_root)}"]
    check_device(cfg)
    if cfg.resume:  # fail here, with the differing keys named, rather than in the ServerApp
        resume_checkpoint(cfg.resume, to_container(cfg), bool(cfg.resume_allow_config_change))
    pool = build_pool(to_container(cfg, "tasks"))
    check_pool(cfg, pool)
    num_nodes = int(cfg.federation.expected_nodes or len(pool))
    # Build (tiny) and check the model once, before the clients ask for it: a path that does not
    # load fails here, with its name, not in 35 clients.
    load_config(resolve_model(to_container(cfg, "model")))
    output_root = writable_dir(output_root or default_output_root(), "--output-dir")  # OutputDirError: exit 2
    workdir = Path(tempfile.mkdtemp(prefix="launch-", dir=output_root))
    console.print(f"[bold]ColD Fusion[/bold]: {num_nodes} virtual clients, {cfg.rounds} rounds, "
                  f"{cfg.contributors_per_round} contributors/round, model={cfg.model.name_or_path}")
    # The overrides as a JSON list: the ServerApp gets each one exactly as given (spaces, quotes, dicts)
    run_config = {"experiment": experiment, "overrides": encode_overrides(overrides), "output-dir": str(output_root)}
    with simulation_superlink(workdir / "superlink.log", allow_faults=bool(cfg.faults.enabled)) as env:
        run_id, status = submit_run(env, run_config, federation_config(cfg, num_nodes), workdir,
                                    timeout_s=run_timeout(cfg))
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
    args = parser.parse_args(argv)
    # SIGTERM (a scheduler, a test, `kill PID`) unwinds like Ctrl-C, so the SuperLink is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        experiment, overrides = pop_experiment(args.overrides)
        status, run_dir = run_simulation(overrides, experiment, args.output_dir)
    except (ConfigError, TaskDataError, ModelLoadError, OutputDirError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RunTimeoutError as exc:  # the SuperLink has been stopped by now
        console.print(f"[red]error:[/red] {exc}")
        return 1
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        records = read_round_records(run_dir)
        console.print(summary_table(records))
        for line in never_scored_lines(records):  # absent from every mean: say so, whatever the status
            console.print(f"[red]warning:[/red] {escape(line)}")
    ok = status == "finished:completed"
    console.print(f"run status: [{'green' if ok else 'red'}]{status}[/]; outputs: {run_dir}")
    if ok and run_dir is not None:
        console.print(f"fused model: {run_dir / 'model'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
