"""``python -m deploy <command>``: the runbook of a multi-site ColD Fusion deployment.

Repository operator::

    python -m deploy ca PKI                                   # ca.key (keep it), ca.crt (give it to sites)
    python -m deploy server-cert PKI --san link.example.org   # server.pem/server.key; SANs 127.0.0.1, localhost + yours
    python -m deploy superlink PKI --state DIR --host 0.0.0.0 --port 9300     # foreground; Ctrl-C stops it
    python -m deploy connection FLWR_HOME --name coldfusion --address link.example.org:9300 --ca PKI/ca.crt
    python -m deploy register site1.pub --connection coldfusion               # once per site key
    python -m deploy run --connection coldfusion --nodes 3 --output-dir /abs/results rounds=5
    python -m deploy results /abs/results                     # newest run: table, report, fused model

Site::

    python -m deploy site-key KEYDIR/site1                    # send KEYDIR/site1.pub to the operator
    python -m deploy check-data /data/mytask                  # what the node will announce (no text)
    python -m deploy supernode --superlink link.example.org:9300 --ca ca.crt --key KEYDIR/site1 \\
        --data-dir /data/mytask --state-dir /srv/coldfusion-state [--role heldout] [--device cuda:0]

``superlink`` and ``supernode`` print the Flower command and replace themselves with it (``exec``): run
them under your process supervisor (systemd, tmux, ...). ``python -m deploy.rehearsal`` does all of it on
loopback in one command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from app.run.superlink import flwr_env
from deploy.tooling import (
    DeployError,
    describe_dataset,
    make_ca,
    make_server_cert,
    make_site_key,
    register_site,
    site_env,
    superlink_command,
    supernode_command,
    write_connection,
)


def _exec(command: list[str], env: dict[str, str]) -> None:
    print("$ " + shlex.join(command), flush=True)
    os.execvpe(command[0], command, env)


def _device_form(value: str) -> str:
    """``--device``: a form torch runs on here (whether this machine has it is checked when the node trains)."""
    from app.run.config import DEVICE_FORM

    if not DEVICE_FORM.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return value


def _operator_env(args) -> dict[str, str]:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    return flwr_env(home.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ca", help="create the federation's CA (operator)")
    p.add_argument("pki", type=Path)

    p = sub.add_parser("server-cert", help="create the SuperLink certificate, signed by the CA (operator)")
    p.add_argument("pki", type=Path)
    p.add_argument("--san", action="append", default=[], help="host name or IP sites dial (repeatable)")

    p = sub.add_parser("superlink", help="start the SuperLink: TLS, SuperNode auth, database on disk (operator)")
    p.add_argument("pki", type=Path)
    p.add_argument("--state", type=Path, required=True, help="directory for superlink.db")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote sites")
    p.add_argument("--port", type=int, default=9300)
    p.add_argument("--flwr-home", type=Path, default=None)

    p = sub.add_parser("connection", help="write the operator's flwr connection (config.toml) (operator)")
    p.add_argument("flwr_home", type=Path)
    p.add_argument("--name", default="coldfusion")
    p.add_argument("--address", required=True, help="HOST:PORT of the SuperLink, a name in its SANs")
    p.add_argument("--ca", type=Path, required=True)

    p = sub.add_parser("register", help="register a site's public key with the SuperLink (operator)")
    p.add_argument("public_key", type=Path)
    p.add_argument("--connection", default="coldfusion")
    p.add_argument("--flwr-home", type=Path, default=None)

    p = sub.add_parser("run", help="start a run against the deployment and wait for it (operator)")
    p.add_argument("--connection", default="coldfusion")
    p.add_argument("--nodes", type=int, required=True, help="sites that must connect (federation.expected_nodes)")
    p.add_argument("--output-dir", type=Path, required=True, help="absolute directory on the SuperLink's host")
    p.add_argument("--experiment", default="")
    p.add_argument("--flwr-home", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rounds=5 contributors_per_round=4")

    p = sub.add_parser("results", help="show the newest run under an output directory (operator)")
    p.add_argument("output_dir", type=Path)

    p = sub.add_parser("site-key", help="create a site's authentication key pair (site)")
    p.add_argument("key", type=Path)

    p = sub.add_parser("check-data", help="load a local dataset as its node will, print its definition (site)")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--task", default=None)

    p = sub.add_parser("supernode", help="start this site's SuperNode (site)")
    p.add_argument("--superlink", required=True, help="HOST:PORT")
    p.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
    p.add_argument("--key", type=Path, required=True, help="this site's private key")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--task", default=None, help="task name (default: meta.json name, then the directory name)")
    p.add_argument("--role", choices=("contributing", "heldout"), default=None)
    p.add_argument("--device", default=None, type=_device_form,
                   help="auto, cpu, cuda, cuda:N or mps (default: the server's client.device)")
    p.add_argument("--port", type=int, default=9400, help="local ClientAppIo port; one per SuperNode on a host")

    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "ca":
        print(make_ca(args.pki))
    elif args.command == "server-cert":
        cert, key = make_server_cert(args.pki, args.san)
        print(f"{cert}\n{key}")
    elif args.command == "superlink":
        args.state.mkdir(parents=True, exist_ok=True)
        _exec(superlink_command(args.pki, args.state / "superlink.db", args.host, args.port), _operator_env(args))
    elif args.command == "connection":
        print(write_connection(args.flwr_home, args.name, args.address, args.ca))
    elif args.command == "register":
        print(f"registered {args.public_key}: node id {register_site(_operator_env(args), args.public_key, args.connection)}")
    elif args.command == "run":
        return _run(args)
    elif args.command == "results":
        return _results(args.output_dir)
    elif args.command == "site-key":
        key, pub = make_site_key(args.key)
        print(f"private key (stays here): {key}\npublic key (send to the operator): {pub}")
    elif args.command == "check-data":
        print(json.dumps(describe_dataset(args.data_dir, args.task), indent=2))
    elif args.command == "supernode":
        info = describe_dataset(args.data_dir, args.task)  # fail here, with the file named, not mid-run
        print(f"dataset: {json.dumps(info)}", flush=True)
        node_config = {"data-dir": args.data_dir.resolve(), "task": args.task, "role": args.role,
                       "state-dir": args.state_dir.resolve(), "device": args.device}
        args.state_dir.mkdir(parents=True, exist_ok=True)
        _exec(supernode_command(args.superlink, args.ca, args.key, args.port, node_config),
              site_env(args.state_dir, dict(os.environ) | {"PATH": flwr_env(args.state_dir)["PATH"]}))
    return 0


def _run(args) -> int:
    import tempfile

    from app.run.config import ConfigError, compose_config, encode_overrides
    from app.run.superlink import RunTimeoutError, run_timeout, submit_run

    overrides = [o for o in args.overrides if not o.startswith("federation.expected_nodes=")]
    overrides.append(f"federation.expected_nodes={args.nodes}")
    try:  # a bad key fails here (exit 2, a user error); and the run is bounded by federation.run_timeout_s
        timeout_s = run_timeout(compose_config(args.experiment, overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # a JSON list: the ServerApp gets every override exactly as given (spaces, quotes, dicts)
    run_config = {"experiment": args.experiment, "overrides": encode_overrides(overrides),
                  "output-dir": str(output_dir)}
    workdir = Path(tempfile.mkdtemp(prefix="deploy-run-"))
    try:
        run_id, status = submit_run(_operator_env(args), run_config, None, workdir, connection=args.connection,
                                    timeout_s=timeout_s)
    except RunTimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run {run_id}: {status}")
    _results(output_dir, run_id)
    return 0 if status == "finished:completed" else 1


def _results(output_dir: Path, run_id: int | None = None) -> int:
    from rich.console import Console

    from app.report import summary_table
    from app.run.outputs import read_round_records

    pattern = f"*-run{run_id}" if run_id is not None else "*-run*"
    runs = sorted(p for p in Path(output_dir).glob(pattern) if p.is_dir())
    if not runs:
        print(f"no run in {output_dir}")
        return 1
    run_dir = runs[-1]
    if (run_dir / "metrics.jsonl").exists():
        Console().print(summary_table(read_round_records(run_dir)))
    print(f"report: {run_dir / 'metrics.jsonl'}\nconfig: {run_dir / 'config.yaml'}\nfused model: {run_dir / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
