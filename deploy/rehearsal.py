"""One-command local rehearsal of a real deployment: TLS + SuperNode auth SuperLink, three sites, a run.

    python -m deploy.rehearsal                 # or: bash deploy/rehearsal.sh
    python -m deploy.rehearsal --rounds 3 --workdir /tmp/rehearsal
    python -m deploy.rehearsal --data site1=../shared/data/imdb model=minilm     # a real dataset and encoder

Everything happens on 127.0.0.1 under one work directory (default ``outputs/rehearsal-<time>/``):

    pki/                       CA and SuperLink certificate (SANs 127.0.0.1, localhost)
    operator/                  SuperLink state database and log, the operator's FLWR_HOME, run outputs
    site1..3/key, key.pub      each site's authentication key pair
    site1..3/data/             each site's own dataset (local format, meta.json), written from the generator
    site1..3/state/            each site's heads and contributions.jsonl (node config state-dir)

Two sites hold contributing tasks, the third a held-out one (node config ``role=heldout``); none of
their tasks is in the server's pool: the server learns them from the nodes. Every process started
(SuperLink, three SuperNodes) is stopped by its process id at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from app.report import summary_table
from app.run.config import compose_config, encode_overrides
from app.run.outputs import read_round_records
from app.run.superlink import (
    default_output_root,
    flwr_env,
    free_port,
    run_timeout,
    submit_run,
)
from deploy.tooling import (
    Processes,
    make_ca,
    make_server_cert,
    make_site_key,
    register_site,
    site_env,
    start_superlink,
    supernode_command,
    wait_for_log,
    write_connection,
    write_local_dataset,
)

CONNECTION = "rehearsal"
console = Console()

# (site, synthetic task its data is generated from, role); the names the sites give their tasks are their own
SITES = (
    ("site1", "syn00_sentiment", "contributing"),
    ("site2", "syn01_topic", "contributing"),
    ("site3", "syn08_same_sent", "heldout"),
)


def small_overrides(rounds: int, sites: int, node_wait_s: int = 120) -> list[str]:
    """The tiny default shrunk to a few minutes on 2 CPU cores."""
    return [f"rounds={rounds}", "contributors_per_round=2", f"federation.expected_nodes={sites}",
            f"federation.node_wait_timeout_s={node_wait_s}", "client.max_steps=5", "tasks.train_size=200",
            "tasks.test_size=100", "eval.probe.max_train_examples=200", "eval.probe.max_test_examples=100"]


def prepare(workdir: Path, train_size: int = 200, test_size: int = 100, data: dict[str, Path] | None = None) -> dict:
    """Certificates, site keys, site datasets: everything a deployment needs before any process starts.
    ``data``: sites that serve a local dataset directory of their own (``--data site1=DIR``), read where it is."""
    data = data or {}
    unknown = sorted(set(data) - {site for site, _, _ in SITES})
    if unknown:
        raise SystemExit(f"--data: no site {unknown} (the sites are {[site for site, _, _ in SITES]})")
    for site, directory in data.items():
        if not (directory / "meta.json").is_file():
            raise SystemExit(f"--data {site}={directory}: not a local dataset directory (no meta.json)")
    pki = workdir / "pki"
    make_ca(pki)
    make_server_cert(pki, hosts=[])
    sites = {}
    for site, synthetic, role in SITES:
        root = workdir / site
        key, pub = make_site_key(root / "key", comment=site)
        if site in data:
            directory = data[site].resolve()
            task = directory.name
        else:
            directory, task = root / "data", f"{site}_{synthetic.split('_', 1)[1]}"
            write_local_dataset(directory, synthetic, name=task, train_size=train_size, test_size=test_size)
        sites[site] = {"key": key, "pub": pub, "data": directory, "state": root / "state", "task": task,
                       "role": role, "log": root / "supernode.log"}
    return {"pki": pki, "sites": sites}


def message_costs(contributions: Path) -> str:
    """A site's fixed cost per train message, from its contribution log: process start (every message is a fresh
    ClientApp process) to the first training step = the process's age when the handler started + its set-up."""
    if not contributions.exists():
        return "no contribution"
    records = [json.loads(line) for line in contributions.read_text().splitlines()]
    costs = sorted(r["process_age_s"] + r["setup_s"] for r in records if "setup_s" in r)
    return "first training step " + ", ".join(f"{c:.1f}" for c in costs) + " s after its process started" \
        if costs else "no timing recorded"


def operator_environment(operator: Path) -> dict[str, str]:
    """The operator's flwr environment; the ServerApp builds the tiny model into a fresh cache of its own.

    (A tiny model cached before the synthetic corpus changed has another vocabulary than the one a site
    builds today, and every body would be refused: the rehearsal never reuses an old cache.)
    """
    env = flwr_env(operator / "flwr-home")
    env["COLDFUSION_CACHE"] = str(operator / "model-cache")
    return env


def check_report(run_dir: Path | None) -> list[str]:
    """Problems a completed status does not show: skipped contributions, unfused rounds, missing model."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return ["no metrics.jsonl was written"]
    problems = []
    for record in read_round_records(run_dir):
        problems += [f"round {record.round}: {f}" for f in record.failures]
        if record.round > 0 and not record.fused:
            problems.append(f"round {record.round}: nothing was fused")
        if not record.probe:
            problems.append(f"round {record.round}: no probe score came back")
    if not (run_dir / "model" / "model.safetensors").exists():
        problems.append("the fused model was not saved")
    return problems


def start_deployment(processes: Processes, workdir: Path, layout: dict, operator_env: dict | None = None,
                     node_extra: dict | None = None) -> dict:
    """SuperLink (TLS, auth, database), register the site keys, start the SuperNodes; wait until connected."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    operator = workdir / "operator"
    env = operator_env or operator_environment(operator)
    write_connection(Path(env["FLWR_HOME"]), CONNECTION, address, layout["pki"] / "ca.crt")
    start_superlink(processes, layout["pki"], operator, port, env=env)
    for name, site in layout["sites"].items():
        site["node-id"] = register_site(env, site["pub"], CONNECTION)
        node_config = {"data-dir": site["data"], "task": site["task"], "role": site["role"],
                       "state-dir": site["state"], **(node_extra or {})}
        command = supernode_command(address, layout["pki"] / "ca.crt", site["key"], free_port(), node_config)
        site["process"] = processes.start(name, command, site_env(site["state"]), site["log"], cwd=workdir / name)
    for name, site in layout["sites"].items():
        # The id line is the event; the deadline only guards a SuperNode that neither connects nor exits
        # (a busy machine needs well over a minute to import torch in three processes at once).
        if not wait_for_log(site["process"], site["log"], "SuperNode ID", timeout=600):
            raise RuntimeError(f"{name}'s SuperNode did not connect within 600 s; see {site['log']}")
    return {"address": address, "env": env, "outputs": operator / "outputs"}


def run(deployment: dict, overrides: list[str], workdir: Path) -> tuple[int, str, Path | None]:
    outputs = deployment["outputs"]
    outputs.mkdir(parents=True, exist_ok=True)
    run_config = {"experiment": "", "overrides": encode_overrides(overrides), "output-dir": str(outputs.resolve())}
    run_id, status = submit_run(deployment["env"], run_config, None, workdir / "operator", connection=CONNECTION,
                                timeout_s=run_timeout(compose_config("", overrides)))
    run_dirs = sorted(outputs.glob(f"*-run{run_id}"))
    return run_id, status, (run_dirs[-1] if run_dirs else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default: outputs/rehearsal-<time> (of the checkout, else of this directory)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", action="append", default=[], metavar="SITE=DIR",
                        help="a site serves this local dataset directory (e.g. site1=../shared/data/imdb) "
                             "instead of a generated one; repeatable")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the run")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.data):
        parser.error(f"--data takes SITE=DIR, got {[item for item in args.data if '=' not in item]}")
    data = {site: Path(directory) for site, directory in (item.split("=", 1) for item in args.data)}
    workdir = (args.workdir or default_output_root() / f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on `kill`, too
    t0 = time.perf_counter()
    console.print(f"[bold]Rehearsal[/bold] in {workdir}")
    layout = prepare(workdir, data=data)
    with Processes() as processes:
        try:
            deployment = start_deployment(processes, workdir, layout)
            console.print(f"SuperLink (TLS, node auth, database) on {deployment['address']}; "
                          f"process ids: {processes.pids()}")
            run_id, status, run_dir = run(deployment, [*small_overrides(args.rounds, len(SITES)), *args.overrides],
                                          workdir)
        finally:
            console.print(f"stopping process groups {sorted(processes.pids().values())}")
    wall = time.perf_counter() - t0
    problems = check_report(run_dir)
    ok = status == "finished:completed" and not problems
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        console.print(summary_table(read_round_records(run_dir)))
    console.print(f"run {run_id} status: [{'green' if status == 'finished:completed' else 'red'}]{status}[/]")
    for problem in problems:
        console.print(f"[red]problem:[/red] {problem}")
    console.print(f"report (metrics.jsonl, config.yaml): {run_dir}")
    console.print(f"fused model: {run_dir / 'model' if run_dir else None}")
    for name, site in layout["sites"].items():
        heads = sorted(p.relative_to(site["state"]) for p in (site["state"] / "heads").rglob("*.safetensors")) \
            if (site["state"] / "heads").exists() else []
        contributions = site["state"] / "contributions.jsonl"
        count = len(contributions.read_text().splitlines()) if contributions.exists() else 0
        console.print(f"{name} ({site['role']}, task {site['task']}): heads {[str(h) for h in heads]}, "
                      f"{count} contribution(s) in {contributions}")
        if count:
            console.print(f"  {name} per train message: {message_costs(contributions)}")
    console.print(f"rehearsal wall time: {wall:.1f}s; all processes stopped")
    (workdir / "rehearsal.json").write_text(json.dumps({"run_id": run_id, "status": status, "run_dir": str(run_dir),
                                                        "wall_s": round(wall, 1)}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
