"""No reply can stop the server; records are keyed by node; a resumed run makes the same decisions.

In-process (real ClientApp handlers, the strategy's real loop), so each case is seconds; the real `flwr run`
paths are in test_simulation.py and test_reliability.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from app.client_app import app as client_app
from app.site.faults import malformed_content
from app.learning.model import initial_body
from app.run.server import round_configs
from strategies.coldfusion import ColdFusion
from strategies.records import task_scores
from strategies.discovery import FederationError, NodeTask, label_nodes
from strategies.records import fused_norms, monitored_score, read_records
from strategies.replies import MalformedReply, read_evaluate_reply, read_query_answer, read_train_reply
from tasks.spec import TaskInfo
from tests.conftest import model_json
from tests.inprocess import InProcessGrid


def _task(message: Message) -> str:
    return json.loads(str(message.content["config"]["task-entry"]))["name"]


def _strategy(pool, records, **kwargs) -> ColdFusion:
    kwargs = {"contributors_per_round": 4, "seed": 0, "node_wait_timeout": 5, **kwargs}
    return ColdFusion(pool=pool, on_round=lambda record, arrays: records.append((record, arrays)), **kwargs)


def _start(strategy, grid, cfg, body, rounds, **kwargs):
    train, evaluate = round_configs(cfg, model_json(cfg))
    return strategy.start(grid, ArrayRecord(body), num_rounds=rounds, timeout=60, train_config=train,
                          evaluate_config=evaluate, **kwargs)


def _grid(client, pool, **kwargs):
    return InProcessGrid(client, [{"partition-id": i, "num-partitions": len(pool)} for i in range(len(pool))], **kwargs)


def _reply_to(content: RecordDict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5000, 0  # a message outside a runtime
    ask = Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=5000)
    return Message(content=content, reply_to=ask)


def _cfg(tiny_cfg, *overrides):
    from app.run.config import compose_config

    return compose_config("quick", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "client.max_steps=2",
                                    "tasks.train_size=200", "tasks.test_size=100", *overrides])


# ------------------------------------------------------------------------------- the readers, one field at a time

GOOD_METRICS = {"train-loss": 0.5, "num-examples": 16, "server-round": 2}


@pytest.mark.parametrize("content, reason", [
    (RecordDict({"metrics": MetricRecord(GOOD_METRICS)}), "reply has no 'arrays' record"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)})}), "reply has no 'metrics' record"),
    (RecordDict({"arrays": ConfigRecord({"w": "x"}), "metrics": MetricRecord(GOOD_METRICS)}),
     "reply's 'arrays' is of type ConfigRecord, expected ArrayRecord"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                 "metrics": MetricRecord({"num-examples": 16, "server-round": 2})}), "'metrics' has no 'train-loss'"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                 "metrics": MetricRecord({**GOOD_METRICS, "num-examples": 1.5})}), "'metrics.num-examples' must be an int"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                 "metrics": MetricRecord({**GOOD_METRICS, "server-round": [1, 2]})}), "'metrics.server-round' must be an int"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                 "metrics": MetricRecord({**GOOD_METRICS, "train-loss": float("nan")})}), "training diverged"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                 "metrics": MetricRecord({**GOOD_METRICS, "num-examples": -3})}), "is negative"),
])
def test_a_malformed_train_reply_is_named_field_by_field(content, reason):
    with pytest.raises(MalformedReply, match=reason.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_train_reply(_reply_to(content))


def test_a_train_reply_whose_array_is_cut_short_is_malformed():
    whole = Array(np.zeros(8, np.float32))
    cut = ArrayRecord({"w": Array(whole.dtype, tuple(whole.shape), whole.stype, whole.data[:-1])})
    with pytest.raises(MalformedReply, match=r"'arrays' cannot be decoded: ValueError: 31 bytes of data for shape"):
        read_train_reply(_reply_to(RecordDict({"arrays": cut, "metrics": MetricRecord(GOOD_METRICS)})))


def test_a_well_formed_train_reply_is_read():
    body = {"w": torch.arange(3, dtype=torch.float32)}
    parsed = read_train_reply(_reply_to(RecordDict({"arrays": ArrayRecord(body),
                                                    "metrics": MetricRecord({**GOOD_METRICS, "head-kept": 0})})))
    assert torch.equal(parsed.body["w"], body["w"])
    assert (parsed.loss, parsed.examples, parsed.round, parsed.head_kept) == (0.5, 16, 2, False)


def test_evaluate_and_query_replies_are_checked():
    ok = _reply_to(RecordDict({"metrics": MetricRecord({"probe.accuracy": 0.5, "num-examples": 3})}))
    assert read_evaluate_reply(ok, ("probe",)) == {"probe": {"accuracy": 0.5}}
    with pytest.raises(MalformedReply, match=r"no scores for the view\(s\) \['finetune'\]"):
        read_evaluate_reply(ok, ("probe", "finetune"))
    with pytest.raises(MalformedReply, match=r"'metrics.probe.accuracy' is inf"):
        read_evaluate_reply(_reply_to(RecordDict({"metrics": MetricRecord({"probe.accuracy": float("inf")})})),
                            ("probe",))
    with pytest.raises(MalformedReply, match="reply has no 'task' record"):
        read_query_answer(ok)
    with pytest.raises(MalformedReply, match=r"'task.info' must be a string"):
        read_query_answer(_reply_to(RecordDict({"task": ConfigRecord({"info": 3, "entry": "{}", "role": ""})})))


# ------------------------------------------------------------------------------- through the strategy's loop

def _malformed_client(bad: dict[str, str]):
    """Train replies of the tasks in ``bad`` come back broken in the named way; evaluation too for 'eval'."""
    def client(message, context):
        reply = client_app(message, context)
        kind = None if message.metadata.message_type == MessageType.QUERY else bad.get(_task(message))
        if kind is None or reply.has_error():
            return reply
        if message.metadata.message_type == MessageType.TRAIN and kind.startswith("train"):
            body, metrics = reply.content["arrays"].to_torch_state_dict(), reply.content["metrics"]
            if kind == "train-nan-loss":
                metrics["train-loss"] = float("nan")
                return Message(content=RecordDict({"arrays": ArrayRecord(body), "metrics": metrics}), reply_to=message)
            round_kind = {"train-missing": 1, "train-wrong-kind": 2, "train-wrong-type": 3}[kind]
            return Message(content=malformed_content(round_kind, body, metrics), reply_to=message)
        if message.metadata.message_type == MessageType.EVALUATE and kind == "eval":
            return Message(content=RecordDict({"metrics": ConfigRecord({"probe.accuracy": "high"})}), reply_to=message)
        return reply
    return client


def test_malformed_replies_are_failures_with_reasons_and_the_round_still_fuses(tiny_cfg, small_pool, tiny_path):
    contributing = [e["name"] for e in small_pool if e["role"] == "contributing"]
    heldout = [e["name"] for e in small_pool if e["role"] == "heldout"]
    kinds = ["train-missing", "train-wrong-kind", "train-wrong-type", "train-nan-loss"]
    bad = dict(zip(contributing, kinds)) | {heldout[0]: "eval"}
    records: list = []
    strategy = _strategy(small_pool, records, contributors_per_round=None, eval_start=False)  # all contributors
    _start(strategy, _grid(_malformed_client(bad), small_pool), _cfg(tiny_cfg), initial_body(tiny_path), rounds=1)
    record = records[1][0]
    reasons = {line.split(": ", 1)[0]: line for line in record.failures}
    assert "reply has no 'metrics' record" in reasons[contributing[0]]
    assert "reply's 'arrays' is of type ConfigRecord" in reasons[contributing[1]]
    assert "'metrics' has no 'train-loss'" in reasons[contributing[2]]
    assert "'metrics.train-loss' is nan: training diverged" in reasons[contributing[3]]
    assert "evaluation failed: reply's 'metrics' is of type ConfigRecord" in reasons[heldout[0]]
    # the two good contributions were fused, and only they: their losses, norms and names
    assert record.fused and record.fused_contributors == sorted(contributing[4:6])
    assert set(record.train_loss) == set(contributing[4:6]) and set(record.update_norms) == set(contributing[4:6])
    assert heldout[0] not in record.probe and heldout[1] in record.probe
    json.dumps(asdict(record), allow_nan=False)  # strict JSON: no NaN anywhere


def test_a_malformed_query_answer_fails_discovery_naming_the_node(tiny_cfg, small_pool):
    def client(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == MessageType.QUERY and context.node_config["partition-id"] == 3:
            return Message(content=RecordDict({"task": ConfigRecord({"entry": "{}"})}), reply_to=message)
        return reply

    grid = _grid(client, small_pool)
    strategy = ColdFusion(pool=small_pool, query_config={"model": model_json(tiny_cfg)})
    with pytest.raises(FederationError, match=r"node 5003: malformed answer to the task query: 'task' has no 'info'"):
        strategy.discover(grid, timeout=10)


def test_min_contributions_above_the_contributing_nodes_fails_at_discovery(tiny_cfg, small_pool):
    strategy = ColdFusion(pool=small_pool, min_contributions=7, contributors_per_round=None)
    with pytest.raises(FederationError, match=r"min_contributions=7 is more than the 6 contributing node\(s\)"):
        strategy.discover(_grid(client_app, small_pool), timeout=10)


def test_one_task_on_two_nodes_is_keyed_by_node_and_sampled_independently_of_node_ids(tiny_cfg, small_pool,
                                                                                     tiny_path):
    twin = next(e["name"] for e in small_pool if e["role"] == "contributing")
    configs = [{"task": e["name"], "site": f"site-{e['name']}"} for e in small_pool] + [{"task": twin, "site": "a"}]
    firsts = []
    for step in (1, -1):  # a second run with other node ids, in the other order
        records: list = []
        grid = InProcessGrid(client_app, configs, node_id_step=step)
        strategy = _strategy(small_pool, records, expected_nodes=len(configs), contributors_per_round=None,
                             eval_start=False)
        _start(strategy, grid, _cfg(tiny_cfg), initial_body(tiny_path), rounds=1)
        record = records[1][0]
        firsts.append(record.contributors)
        twins = [n for n in strategy.nodes.values() if n.name == twin]
        # sorted by site: "site=a" < "site=site-..." -> #1 is the node whose config says site=a
        assert {n.label: n.site for n in twins} == {f"{twin}#1": "site=a", f"{twin}#2": f"site=site-{twin}"}
        labels = {f"{twin}#1", f"{twin}#2"}
        assert labels <= set(record.contributors) and labels <= set(record.fused_contributors)
        assert labels <= set(record.train_loss) and labels <= set(record.update_norms)
        assert twin not in record.train_loss  # nothing keyed by the bare task name collides
        assert len(record.fused_contributors) == 7
        assert set(record.probe) == {e["name"] for e in small_pool}  # scores per task, the twins' averaged
    assert firsts[0] == firsts[1]


def test_task_scores_average_a_tasks_nodes():
    info = TaskInfo("t", 2, False, ("a", "b"))
    nodes = {1: NodeTask(1, "t", "contributing", info, "{}"), 2: NodeTask(2, "t", "contributing", info, "{}"),
             3: NodeTask(3, "u", "heldout", info, "{}")}
    scores = task_scores({1: {"probe": {"accuracy": 0.6}}, 2: {"probe": {"accuracy": 0.8}},
                          3: {"probe": {"accuracy": 0.1}, "finetune": {"accuracy": 0.2}}},
                         {n: t.name for n, t in nodes.items()})
    assert scores == {"probe": {"t": {"accuracy": pytest.approx(0.7)}, "u": {"accuracy": 0.1}},
                      "finetune": {"u": {"accuracy": 0.2}}}
    labelled = {n.node_id: n.label for n in label_nodes(nodes.values())}
    assert labelled == {1: "t#1", 2: "t#2", 3: "u"}  # same (empty) site: ordered by node id, with a warning


def test_one_contributor_per_round_records_that_the_relative_rule_could_not_judge(tiny_cfg, small_pool, tiny_path):
    records: list = []
    strategy = _strategy(small_pool, records, contributors_per_round=1, max_relative_norm=5.0, min_peers=2,
                         eval_schedule={"probe": None})
    _start(strategy, _grid(client_app, small_pool), _cfg(tiny_cfg), initial_body(tiny_path), rounds=3)
    notes = [record.notes for record, _ in records]
    assert notes[1] == [f"{records[1][0].contributors[0]}: relative norm rule not applied (0 peer norm(s) < "
                        "validation.min_peers=2)"]
    assert "(1 peer norm(s)" in notes[2][0]  # round 1's fused norm is round 2's one peer
    assert all(record.fused for record, _ in records[1:])


# ------------------------------------------------------------------------------- resume: the same decisions

SCRIPTED = {0: 0.50, 1: 0.60, 2: 0.00, 3: 0.40, 4: 0.70}  # the probe score (dev and test) of the base after each round


def _scripted_client(message, context):
    """Train for real; evaluation reports a scripted score per round, so back-tracking's decisions are known."""
    if message.metadata.message_type != MessageType.EVALUATE:
        return client_app(message, context)
    score = SCRIPTED[int(message.content["config"]["server-round"])]
    metrics = MetricRecord({"probe.accuracy": score, "probe.macro_f1": score, "probe.dev_accuracy": score,
                            "probe.dev_macro_f1": score, "num-examples": 1})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


def test_a_resumed_run_makes_the_same_back_tracking_decisions_as_an_uninterrupted_one(tiny_cfg, small_pool,
                                                                                     tiny_path):
    # Heads re-initialised per round (seeded): a node keeps no state that the resume would lose. Fusion by
    # heavy-ball momentum: a rolled-back round must undo the server optimizer's step too.
    tiny_cfg = _cfg(tiny_cfg, "client.head_policy=reinit")
    settings = {"backtrack_threshold": 0.05, "backtrack_monitor": "contributing", "contributors_per_round": 2,
                "fusion": {"operator": "fedavgm", "server_lr": 1.0, "momentum": 0.9}}
    start_body = initial_body(tiny_path)
    records: list = []
    states, momenta = [], []
    strategy = _strategy(small_pool, records, **settings)
    strategy.on_round = lambda record, arrays: (records.append((record, arrays)),
                                                states.append(strategy.rng.getstate()),
                                                momenta.append(dict(strategy.fusion.state_dict())))
    reference = _start(strategy, _grid(_scripted_client, small_pool), tiny_cfg, start_body, rounds=4)
    # round 2 (0.0) and round 3 (0.40 < 0.60 - 0.05) are undone; round 4 (0.70) stands
    assert [r.rolled_back for r, _ in records] == [False, False, True, True, False]
    assert [r.base_round for r, _ in records] == [0, 1, 1, 1, 4]
    assert momenta[0] == {} and momenta[1]  # no state before the first fusion
    for undone in (2, 3):  # the momentum after a rolled-back round is the one the kept base was made with
        assert all(torch.equal(momenta[undone][k], v) for k, v in momenta[1].items())
    assert any(not torch.equal(momenta[4][k], v) for k, v in momenta[1].items())
    assert records[4][0].fusion == {"operator": "fedavgm", "server_lr": 1.0, "momentum": 0.9}
    assert monitored_score([r for r, _ in records[:3]], "contributing") == 0.60  # not the undone 0.0
    # the reference norms are round 1's: round 2's fusion was undone, so its norms describe no base in effect
    assert fused_norms([r for r, _ in records[:3]]) == [records[1][0].update_norms[c]
                                                                for c in records[1][0].fused_contributors]

    # resume after the rolled-back round 2: a new strategy, new node ids, the checkpoint's state only
    resumed_records: list = []
    resumed = _strategy(small_pool, resumed_records, **settings)
    resumed.rng.setstate(states[2])
    resumed.fusion.load_state_dict(momenta[2])  # as a checkpoint holds it
    history = read_records(json.loads(json.dumps(asdict(r))) for r, _ in records[:3])  # as read back from metrics.jsonl
    result = _start(resumed, _grid(_scripted_client, small_pool, node_id_step=-1), tiny_cfg,
                    records[2][1].to_torch_state_dict(), rounds=4, first_round=3, history=history)
    assert [(r.round, r.rolled_back, r.base_round, r.contributors) for r, _ in resumed_records] == \
        [(r.round, r.rolled_back, r.base_round, r.contributors) for r, _ in records[3:]]
    final, expected = result.arrays.to_torch_state_dict(), reference.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_a_kept_head_lost_on_resume_is_recorded_as_fresh(tiny_cfg, small_pool, tiny_path):
    cfg = _cfg(tiny_cfg, "client.head_policy=keep")
    records: list = []
    strategy = _strategy(small_pool, records, contributors_per_round=None, eval_schedule={"probe": None})
    _start(strategy, _grid(client_app, small_pool), cfg, initial_body(tiny_path), rounds=2)
    contributing = sorted(e["name"] for e in small_pool if e["role"] == "contributing")
    assert sorted(records[1][0].heads_fresh) == contributing  # first contributions: every head is new
    assert records[2][0].heads_fresh == []  # round 2 found every head of round 1
    # "resume" at round 2 on new nodes (simulation heads live in context.state, which a new run loses)
    resumed: list = []
    again = _strategy(small_pool, resumed, contributors_per_round=None, eval_schedule={"probe": None})
    again.rng = random.Random(0)
    _start(again, _grid(client_app, small_pool), cfg, records[1][1].to_torch_state_dict(), rounds=2,
           first_round=2, history=[r for r, _ in records[:2]])
    assert sorted(resumed[0][0].heads_fresh) == contributing and resumed[0][0].fused


def test_an_error_reply_from_an_unknown_node_is_recorded_not_raised(tiny_cfg, small_pool, tiny_path):
    records: list = []
    strategy = _strategy(small_pool, records)
    grid = _grid(client_app, small_pool)
    strategy.discover(grid, timeout=10)
    strategy._base = ArrayRecord(initial_body(tiny_path))
    ask = Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=999)
    stray = Message(error=Error(code=0, reason="who am I"), reply_to=ask)
    fused, _ = strategy.aggregate_train(1, [stray])
    assert fused is None and strategy._record.failures[0].startswith("node ")


@pytest.mark.parametrize("text, reason", [
    ('[1, 2]', "must be a JSON object"),
    ('{"name": "t", "num_labels": "2", "sentence_pair": false}', "'num_labels' is missing or invalid: '2'"),
    ('{"name": "t", "num_labels": 0, "sentence_pair": false}', "'num_labels' is missing or invalid: 0"),
    ('{"name": "", "num_labels": 2, "sentence_pair": false}', "'name' is missing or invalid"),
    ('{"name": "t", "num_labels": 2}', "'sentence_pair' is missing or invalid: None"),
    ('{"name": "t", "num_labels": 2, "sentence_pair": false, "label_names": [1]}', "'label_names' is missing"),
    ('{"name": "t", "num_labels": 2, "sentence_pair": false, "extra": 1}', "unknown field(s) ['extra']"),
])
def test_a_task_definition_from_a_node_is_checked_field_by_field(text, reason):
    from tasks.spec import TaskDataError

    with pytest.raises(TaskDataError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TaskInfo.from_json(text)
    info = TaskInfo("t", 2, True, ("a", "b"))
    assert TaskInfo.from_json(info.to_json()) == info
