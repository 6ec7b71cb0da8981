"""Building blocks of a real ColD Fusion deployment: certificates, keys, SuperLink, SuperNodes, runs.

Used by ``python -m deploy`` (the runbook's commands), ``deploy/rehearsal.py`` and the deployment
tests. Everything here shells out to the standard tools (``openssl``, ``ssh-keygen``) and to Flower's
own commands (``flower-superlink``, ``flower-supernode``, ``flwr``) with the flags checked against
flwr 1.42; it reuses the Flower process helpers (``app.run.superlink``) for environments, health checks, runs and
process-group shutdown.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from app.run.superlink import PROJECT_DIR, flwr_env, stop_process_group, wait_healthy

DEFAULT_SANS = ("127.0.0.1", "localhost")


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where to look."""


# ---------------------------------------------------------------------- certificates and keys
def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise DeployError(f"{what}: '{command[0]}' is not installed") from exc
    if done.returncode != 0:
        raise DeployError(f"{what} failed ({' '.join(command[:3])} ...): {done.stderr.strip() or done.stdout.strip()}")
    return done


def make_ca(pki_dir: str | Path, days: int = 3650, subject: str = "/CN=ColD Fusion federation CA") -> Path:
    """A self-signed CA (``ca.key`` stays with the operator; ``ca.crt`` goes to every site)."""
    pki = Path(pki_dir)
    pki.mkdir(parents=True, exist_ok=True)
    key, cert = pki / "ca.key", pki / "ca.crt"
    if cert.exists():
        raise DeployError(f"{cert} exists already: refusing to replace a CA that sites may trust")
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-keyout", str(key), "-out", str(cert), "-days", str(days), "-sha256", "-subj", subject,
          "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
         "creating the CA")
    key.chmod(0o600)
    return cert


def san_entries(hosts: Iterable[str]) -> list[str]:
    """``subjectAltName`` entries: IP:... for addresses, DNS:... for names; 127.0.0.1 and localhost always."""
    entries = []
    for host in [*DEFAULT_SANS, *hosts]:
        try:
            entry = f"IP:{ipaddress.ip_address(host)}"
        except ValueError:
            entry = f"DNS:{host}"
        if entry not in entries:
            entries.append(entry)
    return entries


def make_server_cert(pki_dir: str | Path, hosts: Iterable[str] = (), days: int = 825) -> tuple[Path, Path]:
    """The SuperLink's certificate (``server.pem``, ``server.key``) signed by the CA, with the SANs sites dial."""
    pki = Path(pki_dir)
    if not (pki / "ca.key").exists():
        raise DeployError(f"no CA in {pki}: run 'python -m deploy ca {pki}' first")
    hosts = list(hosts)
    key, csr, cert, ext = pki / "server.key", pki / "server.csr", pki / "server.pem", pki / "server.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n" f"subjectAltName={','.join(san_entries(hosts))}\n")
    common_name = hosts[0] if hosts else "localhost"
    _run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}"], "creating the server key")
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
          "-CAcreateserial", "-out", str(cert), "-days", str(days), "-sha256", "-extfile", str(ext)],
         "signing the server certificate")
    key.chmod(0o600)
    csr.unlink()
    return cert, key


def make_site_key(key_path: str | Path, comment: str | None = None) -> tuple[Path, Path]:
    """A site's authentication key pair (ECDSA P-384): the private key never leaves the site."""
    key = Path(key_path)
    if key.exists():
        raise DeployError(f"{key} exists already: refusing to replace a site key")
    key.parent.mkdir(parents=True, exist_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", comment or key.name, "-f", str(key)],
         "creating the site key")
    return key, key.with_name(key.name + ".pub")


# ---------------------------------------------------------------------- the operator's connection
def write_connection(flwr_home: str | Path, name: str, address: str, ca_cert: str | Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one TLS connection to the SuperLink (made the default)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n'
    )
    return config


def register_site(env: Mapping[str, str], public_key: str | Path, connection: str) -> int:
    """``flwr supernode register``: the SuperLink accepts this key from now on; returns the node id."""
    done = _run(["flwr", "supernode", "register", str(public_key), connection, "--format", "json"],
                f"registering {public_key}", env=dict(env), cwd=PROJECT_DIR)
    try:
        answer = json.loads(done.stdout)
        return int(answer["node-id"])
    except (ValueError, KeyError) as exc:
        raise DeployError(f"registering {public_key}: unexpected answer {done.stdout.strip()}") from exc


# ---------------------------------------------------------------------- processes
def superlink_command(pki_dir: str | Path, database: str | Path, host: str = "127.0.0.1",
                      port: int = 9300) -> list[str]:
    pki = Path(pki_dir).resolve()
    return ["flower-superlink", "--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "server.pem"),
            "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth", "--database",
            str(Path(database).resolve()), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def node_config_string(values: Mapping[str, object]) -> str:
    """``--node-config`` value: ``key="value"`` pairs (TOML strings, so paths may hold spaces)."""
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in values.items() if v not in (None, ""))


def supernode_command(superlink: str, ca_cert: str | Path, private_key: str | Path, port: int,
                      node_config: Mapping[str, object]) -> list[str]:
    # Runtime dependency installation is off by default on a SuperNode (there is only an --allow flag).
    return ["flower-supernode", "--superlink", superlink, "--root-certificates", str(Path(ca_cert).resolve()),
            "--auth-supernode-private-key", str(Path(private_key).resolve()), "--port", str(port),
            "--node-config", node_config_string(node_config)]


def site_env(state_dir: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A SuperNode's environment: the venv on PATH, and the model cache inside the site's state dir."""
    env = flwr_env(Path(state_dir) / "flwr-home") if base is None else dict(base)
    env["COLDFUSION_CACHE"] = str(Path(state_dir).resolve() / "model-cache")
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # a SuperLink setting; harmless, but not ours
    return env


@dataclass
class Processes:
    """Every process started here, each in its own session/process group, stopped by its id."""

    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: Mapping[str, str], log_path: Path,
              cwd: Path | None = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(command, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=cwd or PROJECT_DIR)
        self.started.append((name, process))
        return process

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.started}

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM then SIGKILL each process group we started (newest first: SuperNodes before the SuperLink)."""
        for _name, process in reversed(self.started):
            stop_process_group(process, grace)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def start_superlink(processes: Processes, pki_dir: Path, workdir: Path, port: int, host: str = "127.0.0.1",
                    env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """TLS + SuperNode authentication + state database on disk; returns once ``/health`` answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "superlink.log"
    process = processes.start("superlink", superlink_command(pki_dir, workdir / "superlink.db", host, port),
                              env or flwr_env(workdir / "flwr-home"), log_path, cwd=workdir)
    wait_healthy(port, process, log_path, ca_cert=Path(pki_dir) / "ca.crt")
    return process


def wait_for_log(process: subprocess.Popen, log_path: Path, needle: str, timeout: float = 60.0) -> bool:
    """True once ``needle`` appears in the log; False if the process exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and needle in log_path.read_text(errors="replace"):
            return True
        if process.poll() is not None:
            return log_path.exists() and needle in log_path.read_text(errors="replace")
        time.sleep(0.3)
    return False


# ---------------------------------------------------------------------- datasets for rehearsals
def write_local_dataset(data_dir: str | Path, synthetic_name: str, name: str | None = None,
                        train_size: int = 200, test_size: int = 100, seed: int = 0, num_tasks: int = 35) -> Path:
    """Write one synthetic task in the local-dataset format (``train.jsonl``, ``test.jsonl``, ``meta.json``)."""
    from tasks.synthetic import load_synthetic, synthetic_task_infos

    info = {i.name: i for i in synthetic_task_infos(seed, num_tasks)}[synthetic_name]
    data = load_synthetic(synthetic_name, seed, num_tasks, train_size, test_size)
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in data[split]:
                fh.write(json.dumps(row) + "\n")
    meta = {"name": name or synthetic_name, "task": "classification", "label_names": list(info.label_names),
            "sentence_pair": info.sentence_pair, "source": f"synthetic task {synthetic_name} (seed {seed})"}
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def describe_dataset(data_dir: str | Path, task: str | None = None) -> dict:
    """Load a site's dataset with the real local loader; what its node will tell the server (no text)."""
    from tasks.local import load_local_task

    info, data = load_local_task(Path(data_dir), task)
    return {"definition": json.loads(info.to_json()), "rows": {split: len(ds) for split, ds in data.items()}}
