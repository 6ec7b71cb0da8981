"""The ClientApp's handlers called directly, as Flower would call them."""

import json

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)

from app.client_app import app as client_app
from app.client_app import node_task_entry
from app.config import to_container
from app.model import build_classifier, initial_body
from app.server_app import round_configs
from tasks.registry import entry_key, load_task_cached
from tasks.spec import TaskDataError
from tests.conftest import model_json


def _train_message(cfg, pool, body, server_round, **recipe_overrides):
    recipe = {**to_container(cfg, "client"), **recipe_overrides}
    config = ConfigRecord({"model": model_json(cfg), "seed": 0, "recipe": json.dumps(recipe),
                           "task-entry": entry_key(pool[2]), "server-round": server_round})
    return Message(content=RecordDict({"arrays": ArrayRecord(body), "config": config}),
                   message_type=MessageType.TRAIN, dst_node_id=7)


def test_query_reports_the_task_of_the_partition(tiny_cfg, pool, node):
    msg = Message(content=RecordDict({"config": ConfigRecord({"pool": json.dumps(pool)})}),
                  message_type=MessageType.QUERY, dst_node_id=7)
    answer = client_app(msg, node).content["task"]
    assert json.loads(str(answer["info"]))["name"] == pool[2]["name"]
    assert json.loads(str(answer["entry"]))["name"] == pool[2]["name"]


def test_train_returns_the_body_only_and_keeps_its_head(tiny_cfg, tiny_path, pool, node):
    body = initial_body(tiny_path)
    reply = client_app(_train_message(tiny_cfg, pool, body, 1), node)
    assert not reply.has_error(), reply.error
    returned = reply.content["arrays"].to_torch_state_dict()
    assert set(returned) == set(body)  # exactly the body keys: no head key leaves the node
    assert not any(k.startswith("classifier") for k in returned)
    assert any(not torch.equal(returned[k], body[k]) for k in body), "training changed nothing"
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 5 * int(tiny_cfg.client.batch_size) and metrics["steps"] == 5
    head_key = f"head:{pool[2]['name']}"
    head1 = node.state[head_key].to_torch_state_dict()
    assert head1 and all(k.startswith("classifier") for k in head1)

    # round 2: the stored head is loaded (not re-initialised), then trained further
    reply = client_app(_train_message(tiny_cfg, pool, body, 2), node)
    head2 = node.state[head_key].to_torch_state_dict()
    num_labels = load_task_cached(entry_key(pool[2]))[0].num_labels
    fresh = build_classifier(tiny_path, num_labels, 0).state_dict()
    assert any(not torch.equal(head2[k], head1[k]) for k in head1)
    # after one more short round the head stays much closer to round 1's than a fresh one is
    drift = sum((head2[k] - head1[k]).norm() for k in head1)
    assert drift < sum((fresh[k] - head1[k]).norm() for k in head1 if k in fresh)


def test_reinit_policy_starts_each_round_from_a_fresh_head(tiny_cfg, tiny_path, pool, node):
    body = initial_body(tiny_path)
    client_app(_train_message(tiny_cfg, pool, body, 1, head_policy="reinit"), node)
    assert not any(k.startswith("head:") for k in node.state), "reinit must not store heads"
    # same round, same seed: identical result, whatever happened before (no hidden head reuse)
    a = client_app(_train_message(tiny_cfg, pool, body, 3, head_policy="reinit"), node)
    b = client_app(_train_message(tiny_cfg, pool, body, 3, head_policy="reinit"), node)
    ta, tb = a.content["arrays"].to_torch_state_dict(), b.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _evaluate_message(cfg, path, entry, views: str, role: str = "contributing") -> Message:
    _, evaluate = round_configs(cfg, model_json(cfg))
    config = ConfigRecord({**dict(evaluate), "task-entry": entry_key(entry), "server-round": 0, "views": views,
                           "role": role})
    return Message(content=RecordDict({"arrays": ArrayRecord(initial_body(path)), "config": config}),
                   message_type=MessageType.EVALUATE, dst_node_id=7)


def test_evaluate_reports_both_views(tiny_cfg, tiny_path, pool, node):
    reply = client_app(_evaluate_message(tiny_cfg, tiny_path, pool[2], "probe,finetune"), node)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    for view in ("probe", "finetune"):
        assert 0.0 <= metrics[f"{view}.accuracy"] <= 1.0 and 0.0 <= metrics[f"{view}.macro_f1"] <= 1.0
    assert metrics["finetune.steps"] == tiny_cfg.eval.finetune.max_steps
    assert metrics["num-examples"] == 100


def test_node_task_entry_from_node_config(pool, tmp_path):
    assert node_task_entry({"partition-id": 4}, pool)["name"] == pool[4]["name"]
    assert node_task_entry({"task": pool[1]["name"]}, pool)["name"] == pool[1]["name"]
    entry = node_task_entry({"task": "mine", "data-dir": str(tmp_path)}, pool)
    assert entry == {"source": "local", "path": str(tmp_path), "name": "mine"}
    with pytest.raises(TaskDataError, match="partition-id 99 has no task"):
        node_task_entry({"partition-id": 99}, pool)
    with pytest.raises(TaskDataError, match="'nope' is not in the server's task pool"):
        node_task_entry({"task": "nope"}, pool)
