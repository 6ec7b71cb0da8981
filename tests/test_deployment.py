"""Deployment: site state on disk, what leaves a site, and a real TLS + node-auth deployment on loopback."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from app.client_app import app as client_app
from app.run.config import to_container
from app.learning.model import initial_body
from app.site.state import SiteState, SiteStateError, safe_name
from deploy.tooling import (
    make_ca,
    make_server_cert,
    node_config_string,
    san_entries,
    write_local_dataset,
)
from tests.conftest import ROBERTA_HEAD, SPLITS, model_json

SYNTHETIC = "syn00_sentiment"


# ---------------------------------------------------------------------- site state (pure)
def test_site_state_heads_are_atomic_scoped_and_stay_inside(tmp_path):
    site = SiteState(tmp_path / "state")
    head = {"classifier.dense.weight": torch.randn(3, 4), "classifier.out_proj.bias": torch.zeros(2)}
    assert site.load_head("t", 1, "run") is None
    path = site.save_head("t", 1, "run", head)
    assert path == tmp_path / "state" / "heads" / "run-1" / "t.safetensors"
    loaded = site.load_head("t", 1, "run")
    assert all(torch.equal(loaded[k], head[k]) for k in head)
    assert site.load_head("t", 2, "run") is None, "a run-scoped head must not leak into another run"
    site.save_head("t", 1, "site", head)
    assert site.load_head("t", 99, "site") is not None, "a site-scoped head persists across runs"
    assert not list((tmp_path / "state").rglob("*.tmp")), "temporary files must be renamed or removed"
    # hostile task names stay inside the state directory
    for name in ("../../etc/passwd", "/abs", "a/b", ".."):
        p = site.save_head(name, 1, "site", head)
        assert (tmp_path / "state") in p.parents and p.parent.name == "heads"
    assert safe_name("a/b") != safe_name("a_b")
    with pytest.raises(SiteStateError, match="head_scope"):
        site.head_path("t", 1, "forever")
    with pytest.raises(SiteStateError, match="absolute"):
        SiteState("relative/state")


def test_site_state_contribution_log(tmp_path):
    site = SiteState(tmp_path)
    site.log_contribution(run_id=5, round=1, task="t", train_loss=0.5, examples=10, seconds=1.0)
    site.log_contribution(run_id=5, round=2, task="t", train_loss=0.4, examples=10, seconds=1.0)
    rows = site.contributions()
    assert [r["round"] for r in rows] == [1, 2] and all("time" in r for r in rows)


def test_certificate_sans_and_node_config():
    assert san_entries(["link.example.org", "10.0.0.5", "localhost"]) == [
        "IP:127.0.0.1", "DNS:localhost", "DNS:link.example.org", "IP:10.0.0.5"]
    assert node_config_string({"data-dir": "/a b", "role": None, "task": "x"}) == 'data-dir="/a b" task="x"'


def test_server_certificate_verifies_against_the_ca(tmp_path):
    make_ca(tmp_path)
    cert, _key = make_server_cert(tmp_path, ["link.example.org"])
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(cert)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True,
                          text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text and "DNS:link.example.org" in text


def test_a_rehearsal_site_can_serve_a_dataset_directory_of_its_own(tmp_path):
    from deploy.rehearsal import message_costs, prepare

    own = tmp_path / "imdb_like"
    write_local_dataset(own, SYNTHETIC, name="imdb_like", train_size=20, test_size=10)
    layout = prepare(tmp_path / "work", train_size=20, test_size=10, data={"site1": own})
    assert layout["sites"]["site1"]["data"] == own.resolve() and layout["sites"]["site1"]["task"] == "imdb_like"
    assert (layout["sites"]["site2"]["data"] / "meta.json").is_file()  # the others are generated as before
    with pytest.raises(SystemExit, match=r"--data site1=.*nowhere: not a local dataset directory"):
        prepare(tmp_path / "w2", data={"site1": tmp_path / "nowhere"})
    with pytest.raises(SystemExit, match=r"no site \['site9'\]"):
        prepare(tmp_path / "w3", data={"site9": own})
    log = tmp_path / "contributions.jsonl"  # a message's cost: the process's age + the handler's set-up
    log.write_text('{"process_age_s": 3.5, "setup_s": 1.25}\n{"process_age_s": 3.0, "setup_s": 0.5}\n')
    assert message_costs(log) == "first training step 3.5, 4.8 s after its process started"


# ---------------------------------------------------------------------- the ClientApp at a site
@pytest.fixture()
def site(tmp_path, tiny_cfg):
    """A deployed site: its own local dataset and state directory, a persisted head policy."""
    data = write_local_dataset(tmp_path / "data", SYNTHETIC, name="clinic_notes", train_size=120, test_size=60)
    texts = set()
    for split in ("train", "test"):
        for line in (data / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts.update(t for t in (row["text"], row.get("text_pair")) if t)
    return {"data": data, "state": tmp_path / "state", "texts": texts}


def _context(site, run_id: int) -> Context:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 7, 0
    node_config = {"data-dir": str(site["data"]), "state-dir": str(site["state"]), "role": "contributing"}
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _messages(cfg, body, entry: str, server_round: int, head_scope: str = "run"):
    recipe = {**to_container(cfg, "client"), "head_scope": head_scope, "device": "cpu"}
    common = {"model": model_json(cfg), "seed": 0, "task-entry": entry, "server-round": server_round}
    train = Message(content=RecordDict({"arrays": ArrayRecord(body), "config": ConfigRecord(
        {**common, "recipe": json.dumps(recipe)})}), message_type=MessageType.TRAIN, dst_node_id=7)
    evaluate = Message(content=RecordDict({"arrays": ArrayRecord(body), "config": ConfigRecord(
        {**common, "recipe": json.dumps(recipe), "eval": json.dumps(to_container(cfg, "eval")), "views": "probe",
         "role": "contributing"})}), message_type=MessageType.EVALUATE, dst_node_id=7)
    return train, evaluate


def _strings(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, bytes):
        yield value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        yield value


def _assert_nothing_private(reply: Message, head_keys: set[str], texts: set[str]) -> None:
    """No head tensor (by key or by value) and no example text in any record of a reply; the only arrays that
    leave are exactly the tiny RoBERTa's body (hand-written oracle, tests/conftest.py)."""
    assert not reply.has_error(), reply.error
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            keys = set(record.keys())
            assert not keys & head_keys, f"head tensor {keys & head_keys} left the site in '{name}'"
            assert keys == SPLITS["tiny"]["body"], f"'{name}' is not exactly the body: {sorted(keys ^ SPLITS['tiny']['body'])[:5]}"
        for key, value in record.items():
            for text in _strings(value if not isinstance(record, ArrayRecord) else []):
                leaked = [t for t in texts if t and t in text]
                assert not leaked, f"example text left the site in {name}.{key}: {leaked[:1]}"


def test_only_body_and_metrics_leave_a_site(tiny_cfg, tiny_path, site):
    context = _context(site, run_id=11)
    body = initial_body(tiny_path)
    pool = [{"source": "synthetic", "name": SYNTHETIC, "seed": 0, "num_tasks": 35, "train_size": 200,
             "test_size": 100, "role": "contributing"}]
    query = Message(content=RecordDict({"config": ConfigRecord({"pool": json.dumps(pool)})}),
                    message_type=MessageType.QUERY, dst_node_id=7)
    answer = client_app(query, context)
    entry = str(answer.content["task"]["entry"])
    assert json.loads(str(answer.content["task"]["info"]))["name"] == "clinic_notes"

    train, evaluate = _messages(tiny_cfg, body, entry, 1)
    trained = client_app(train, context)
    head_file = site["state"] / "heads" / "run-11" / "clinic_notes.safetensors"
    assert head_file.is_file(), "the head must persist in the site's state dir"
    from safetensors.torch import load_file

    head = load_file(str(head_file))
    assert set(head) == ROBERTA_HEAD  # what stays: exactly the classification head (dense + out_proj)
    evaluated = client_app(evaluate, context)
    for reply in (answer, trained, evaluated):
        _assert_nothing_private(reply, set(head), site["texts"])
    # and no returned tensor equals a head tensor under another name
    for tensor in trained.content["arrays"].to_torch_state_dict().values():
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in head.values())
    assert set(trained.content["arrays"].keys()) == set(body)
    assert set(trained.content) == {"arrays", "metrics"} and set(evaluated.content) == {"metrics"}
    # the metrics that leave: known keys only, with the values this site's data and recipe imply
    # (120 train examples in batches of 32, 5 steps: 32 + 32 + 32 + 24, then 32 of the second epoch)
    metrics = dict(trained.content["metrics"])
    assert set(metrics) == {"train-loss", "num-examples", "steps", "stopped-early", "seconds", "server-round",
                            "head-kept", "process-age-s", "setup-s"}, sorted(metrics)  # timings: the message's cost
    assert metrics["num-examples"] == 152 and metrics["steps"] == int(tiny_cfg.client.max_steps) == 5
    assert metrics["server-round"] == 1 and metrics["head-kept"] == 0 and metrics["stopped-early"] == 0
    assert 0 < metrics["train-loss"] < 10 and metrics["seconds"] >= 0
    assert metrics["setup-s"] >= 0 and metrics["process-age-s"] >= 0
    scores = dict(evaluated.content["metrics"])
    assert scores["num-examples"] == 60  # the site's 60 test examples
    assert all(k.startswith("probe.") for k in set(scores) - {"num-examples"}) and "probe.accuracy" in scores
    assert abs(scores["probe.accuracy"] * 60 - round(scores["probe.accuracy"] * 60)) < 1e-9  # k correct of 60


def test_site_head_persists_across_rounds_and_runs_on_disk(tiny_cfg, tiny_path, site):
    body = initial_body(tiny_path)
    entry = json.dumps({"name": "clinic_notes", "path": str(site["data"]), "source": "local"}, sort_keys=True)
    # every message in a deployment runs in a fresh process: a fresh Context each time, state on disk only
    client_app(_messages(tiny_cfg, body, entry, 1, "site")[0], _context(site, run_id=21))
    state = SiteState(site["state"])
    head1 = state.load_head("clinic_notes", 0, "site")
    client_app(_messages(tiny_cfg, body, entry, 2, "site")[0], _context(site, run_id=21))
    client_app(_messages(tiny_cfg, body, entry, 1, "site")[0], _context(site, run_id=22))  # the next run
    rows = state.contributions()
    assert [(r["run_id"], r["round"], r["head"]) for r in rows] == [(21, 1, "fresh"), (21, 2, "loaded"),
                                                                   (22, 1, "loaded")]
    assert all(r["task"] == "clinic_notes" and r["examples"] > 0 and r["seconds"] >= 0 for r in rows)
    head3 = state.load_head("clinic_notes", 0, "site")
    assert any(not torch.equal(head1[k], head3[k]) for k in head1)
    # run scope: the next run starts from a fresh head
    client_app(_messages(tiny_cfg, body, entry, 1, "run")[0], _context(site, run_id=23))
    assert state.contributions()[-1]["head"] == "fresh"
    # the site wrote only inside its own directories
    written = {p for p in site["state"].parent.rglob("*") if p.is_file()}
    assert all(site["state"] in p.parents or site["data"] in p.parents for p in written)


# ---------------------------------------------------------------------- a real deployment on loopback
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS, SuperNode auth, database) + three registered SuperNodes with their own data and state.

    Every process is started in its own process group and stopped by its id when the module ends,
    whatever happened (the finalizer runs on failures and errors too).
    """
    from deploy.rehearsal import prepare, start_deployment
    from deploy.tooling import Processes

    workdir = tmp_path_factory.mktemp("deployment")
    layout = prepare(workdir, train_size=200, test_size=100)
    processes = Processes()
    try:
        deployment = start_deployment(processes, workdir, layout)
        yield {"workdir": workdir, "layout": layout, "processes": processes, **deployment}
    finally:
        processes.stop_all()
        for name, process in processes.started:
            assert process.poll() is not None, f"{name} (pid {process.pid}) is still running"


@pytest.mark.slow
def test_three_sites_complete_two_rounds_over_tls_with_node_auth(deployment, capsys):
    """Through the operator's CLI (``python -m deploy run``), with overrides a space-joined run config would break:
    a model cache path with a space (the ServerApp and every site build the model there) and a dict value."""
    import yaml

    from app.run.outputs import read_metrics
    from deploy.__main__ import main as deploy_main
    from deploy.rehearsal import check_report, small_overrides

    cache = deployment["workdir"] / "operator" / "model cache"
    slow = {"site1_sentiment": 1.5, "site2_topic": 2}  # faults.enabled=false: recorded, never acted on
    code = deploy_main(["run", "--connection", "rehearsal", "--nodes", "3", "--output-dir", str(deployment["outputs"]),
                        "--flwr-home", deployment["env"]["FLWR_HOME"], *small_overrides(2, 3),
                        f"model.cache_dir={cache}", "faults.slow={site1_sentiment: 1.5, site2_topic: 2}"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    run_id = int(re.search(r"^run (\d+): finished:completed$", out, re.MULTILINE).group(1))
    run_dir = sorted(deployment["outputs"].glob(f"*-run{run_id}"))[-1]
    assert (run_dir / "model" / "model.safetensors").is_file()
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["model"]["cache_dir"] == str(cache) and written["faults"]["slow"] == slow
    assert [p.name for p in cache.glob("tiny-*")], f"nothing was built in {cache}"
    assert check_report(run_dir) == []
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    sites = deployment["layout"]["sites"]
    contributing = {s["task"] for s in sites.values() if s["role"] == "contributing"}
    heldout = {s["task"] for s in sites.values() if s["role"] == "heldout"}
    for record in records[1:]:
        assert set(record["contributors"]) == contributing  # the held-out site never trains
    assert set(records[-1]["probe"]) == contributing | heldout
    for site in sites.values():
        state = SiteState(site["state"])
        if site["role"] == "heldout":
            assert state.contributions() == []
            continue
        head = site["state"] / "heads" / f"run-{run_id}" / f"{site['task']}.safetensors"
        assert head.is_file(), f"{site['task']}: head not persisted in its state dir"
        rows = state.contributions()
        assert [(r["run_id"], r["round"], r["head"]) for r in rows] == [(run_id, 1, "fresh"), (run_id, 2, "loaded")]


@pytest.mark.slow
def test_the_server_refuses_to_start_without_the_required_nodes(deployment, capsys):
    from deploy.rehearsal import run, small_overrides

    _run_id, status, _run_dir = run(deployment, small_overrides(1, 4, node_wait_s=3), deployment["workdir"])
    assert status == "finished:failed"
    assert "only 3 of the 4 expected nodes connected within 3s" in capsys.readouterr().out


@pytest.mark.slow
def test_the_server_refuses_conflicting_definitions_of_a_task(deployment, capsys, tmp_path):
    """A fourth site claims site1's task name with other labels: the run stops at discovery, naming it."""
    from app.run.superlink import free_port
    from deploy.rehearsal import run, small_overrides
    from deploy.tooling import (
        make_site_key,
        register_site,
        site_env,
        supernode_command,
        wait_for_log,
    )

    site1 = deployment["layout"]["sites"]["site1"]
    data = write_local_dataset(tmp_path / "data", "syn01_topic", name=site1["task"], train_size=50, test_size=20)
    key, pub = make_site_key(tmp_path / "key")
    register_site(deployment["env"], pub, "rehearsal")
    command = supernode_command(deployment["address"], deployment["layout"]["pki"] / "ca.crt", key, free_port(),
                                {"data-dir": data, "state-dir": tmp_path / "state"})
    log = tmp_path / "supernode.log"
    process = deployment["processes"].start("conflicting", command, site_env(tmp_path / "state"), log)
    try:
        # an event, not a duration: the line appears, or the process ends without it
        assert wait_for_log(process, log, "SuperNode ID", timeout=math.inf), log.read_text()[-2000:]
        _run_id, status, _run_dir = run(deployment, small_overrides(1, 4, node_wait_s=60), deployment["workdir"])
        assert status == "finished:failed"
        out = capsys.readouterr().out
        assert f"claim incompatible definitions of task '{site1['task']}'" in out, out[-3000:]
    finally:
        from app.run.superlink import stop_process_group

        stop_process_group(process)  # the other tests see the three sites only


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(deployment, tmp_path):
    from app.run.superlink import free_port
    from deploy.tooling import make_site_key, site_env, supernode_command

    key, _pub = make_site_key(tmp_path / "intruder")
    command = supernode_command(deployment["address"], deployment["layout"]["pki"] / "ca.crt", key, free_port(),
                                {"task": SYNTHETIC, "state-dir": tmp_path / "state"})
    log = tmp_path / "intruder.log"
    process = deployment["processes"].start("intruder", [*command, "--max-retries", "1"],
                                            site_env(tmp_path / "state"), log)
    # Events, not durations: the SuperNode logs its refusal (or, wrongly, its id), or it exits.
    text = _wait_for_any_line(process, log, ("Failed to activate SuperNode", "SuperNode ID"))
    assert "SuperNode ID" not in text, f"the SuperNode with an unregistered key was accepted; see {log}"
    process.wait()  # refused with --max-retries 1: it exits by itself
    text = log.read_text()
    assert process.returncode != 0 and "Failed to activate SuperNode" in text, text[-2000:]
    assert "SuperNode ID" not in text


def _wait_for_any_line(process: subprocess.Popen, log, needles: tuple[str, ...], poll: float = 0.3) -> str:
    """The log's text once one of ``needles`` is in it or the process has exited: no deadline, so a busy machine
    only makes it wait longer. The polling interval is not a limit."""
    while True:
        exited = process.poll() is not None
        text = log.read_text(errors="replace") if log.exists() else ""
        if exited or any(needle in text for needle in needles):
            return text
        time.sleep(poll)


def test_the_sites_device_setting_wins_over_the_servers(tiny_cfg, tiny_path, site):
    """A site without a GPU says device=cpu; the server's client.device (here cuda) does not apply there."""
    body = initial_body(tiny_path)
    entry = json.dumps({"name": "clinic_notes", "path": str(site["data"]), "source": "local"}, sort_keys=True)
    context = _context(site, run_id=31)  # first: a Message needs the task identity it sets
    train, _evaluate = _messages(tiny_cfg, body, entry, 1)
    recipe = json.loads(str(train.content["config"]["recipe"]))
    train.content["config"]["recipe"] = json.dumps({**recipe, "device": "cuda:7"})
    context.node_config["device"] = "cpu"
    reply = client_app(train, context)
    assert not reply.has_error(), reply.error
    assert SiteState(site["state"]).contributions()[-1]["device"] == "cpu"


@pytest.mark.parametrize("site_setting, server_setting, message", [
    (None, "cuda", "the server's client.device='cuda' is not available on this site: torch sees 0 CUDA device(s) "
                   "here; set the site's device (node config device=cpu, `python -m deploy supernode ... --device cpu`)"),
    ("cuda:1", "cpu", "this site's node config device='cuda:1' is not available on this site: torch sees 1 CUDA "
                      "device(s) here; set the site's device"),
    ("gpu", "cpu", "this site's node config device='gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_the_site_does_not_have_is_refused_before_training(site_setting, server_setting, message, tiny_cfg,
                                                                     tiny_path, site, monkeypatch):
    """In a deployment the site decides where it trains: a device it lacks is refused with the setting to change."""
    from app.site.contributor import DeviceError

    seen = 0 if server_setting == "cuda" else 1  # what torch "sees" here: the oracle, not this machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: seen)
    entry = json.dumps({"name": "clinic_notes", "path": str(site["data"]), "source": "local"}, sort_keys=True)
    _context(site, run_id=41)  # a Message needs the task identity a context sets
    train, evaluate = _messages(tiny_cfg, initial_body(tiny_path), entry, 1)
    for message_ in (train, evaluate):
        recipe = json.loads(str(message_.content["config"]["recipe"]))
        message_.content["config"]["recipe"] = json.dumps({**recipe, "device": server_setting})
        context = _context(site, run_id=41)  # a fresh one per message, as in a deployment
        if site_setting:
            context.node_config["device"] = site_setting
        with pytest.raises(DeviceError, match=re.escape(message)):
            client_app(message_, context)
    assert SiteState(site["state"]).contributions() == []  # nothing trained


def test_deploy_supernode_refuses_a_device_that_is_no_device(capsys):
    from deploy.__main__ import main as deploy_main

    with pytest.raises(SystemExit) as info:
        deploy_main(["supernode", "--superlink", "h:1", "--ca", "ca.crt", "--key", "k", "--data-dir", "d",
                     "--state-dir", "s", "--device", "gpu0"])
    assert info.value.code == 2
    assert "argument --device: 'gpu0' is not a device: use auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err


def test_deploy_run_refuses_an_unknown_key_with_exit_2_before_submitting(tmp_path, capsys, monkeypatch):
    import deploy.__main__ as deploy_cli

    def tripwire(*_args, **_kwargs):
        raise AssertionError("deploy run submitted a run: the bad key was not caught before")
    monkeypatch.setattr("app.run.superlink.submit_run", tripwire)
    code = deploy_cli.main(["run", "--nodes", "3", "--output-dir", str(tmp_path / "out"), "+roundz=3"])
    assert code == 2
    assert "error: unknown config key 'roundz'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
