"""The ClientApp's handlers called directly, as Flower would call them."""

import json

import numpy as np
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
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from app.client_app import app as client_app
from app.site.contributor import node_task_entry
from app.run.config import compose_config, to_container
from app.learning.model import body_signature, initial_body, save_fused_model
from app.run.server import round_configs
from strategies.coldfusion import ColdFusion
from tasks.registry import entry_key
from tasks.spec import TaskDataError
from tests.conftest import SPLITS, model_json
from tests.inprocess import InProcessGrid


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


def _minilm_cfg(tiny_cfg):
    return compose_config("quick", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "model=minilm",
                                    "client.max_steps=2", "client.max_length=32", "client.lr=1e-4",
                                    "tasks.train_size=200", "tasks.test_size=100"])


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_train_sends_exactly_the_body_and_keeps_exactly_the_head(name, tiny_cfg, pool, node, request):
    """Per architecture, the keys of the actual train reply and of the head the node stored (hand-written oracle,
    tests/conftest.py): RoBERTa keeps classifier.dense + out_proj and sends no pooler; BERT sends its pooler."""
    cfg = tiny_cfg if name == "tiny" else _minilm_cfg(tiny_cfg)
    path = request.getfixturevalue("tiny_path" if name == "tiny" else "minilm_path")
    expected = SPLITS[name]
    body = initial_body(path)
    reply = client_app(_train_message(cfg, pool, body, 1), node)
    assert not reply.has_error(), reply.error
    assert set(reply.content) == {"arrays", "metrics"}
    returned = reply.content["arrays"].to_torch_state_dict()
    assert set(returned) == expected["body"]
    head = node.state[f"head:{pool[2]['name']}"].to_torch_state_dict()
    assert set(head) == expected["head"]
    # body (under the base model's prefix) and head are the whole classifier, as transformers builds it
    config = AutoConfig.from_pretrained(path, num_labels=len(head["classifier.out_proj.bias" if name == "tiny"
                                                                  else "classifier.bias"]))
    whole = set(AutoModelForSequenceClassification.from_config(config).state_dict())
    assert {f"{expected['prefix']}.{k}" for k in returned} | set(head) == whole
    # what left was trained here, the whole body (BERT's pooler included), and no head tensor left under any name
    assert all(not torch.equal(returned[k], body[k]) for k in ("embeddings.word_embeddings.weight",
                                                                "encoder.layer.0.attention.self.query.weight"))
    if name == "minilm":
        assert not torch.equal(returned["pooler.dense.weight"], body["pooler.dense.weight"])
    for tensor in head.values():
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in returned.values())
    metrics = reply.content["metrics"]
    steps = int(cfg.client.max_steps)
    assert metrics["num-examples"] == steps * int(cfg.client.batch_size) and metrics["steps"] == steps
    # a message's fixed cost, as the reply says it: set-up within the handler, the process's age before it
    assert 0 < metrics["setup-s"] < 60 and metrics["process-age-s"] > 0


def test_process_age_agrees_with_psutil():
    import time

    import psutil

    from app.site.contributor import process_age

    now = time.time()  # psutil's create_time rests on /proc/stat's btime, whole seconds: up to 1 s off
    assert process_age(now) == pytest.approx(now - psutil.Process().create_time(), abs=1.5)


def test_a_kept_head_is_exactly_the_head_stored_after_the_previous_round(tiny_cfg, tiny_path, pool, node):
    """Round 2 trains with lr=0, so its model ends exactly where it started: the stored head must then be the
    round-1 head bit for bit (a fresh head, or one that was never loaded, would differ from it)."""
    body = initial_body(tiny_path)
    head_key = f"head:{pool[2]['name']}"
    fresh_node = Context(run_id=1, node_id=8, node_config=dict(node.node_config), state=RecordDict(), run_config={})
    client_app(_train_message(tiny_cfg, pool, body, 1, lr=0.0), fresh_node)
    fresh = fresh_node.state[head_key].to_torch_state_dict()  # the head round 1 starts from, untouched

    client_app(_train_message(tiny_cfg, pool, body, 1), node)
    head1 = node.state[head_key].to_torch_state_dict()
    assert all(not torch.equal(head1[k], fresh[k]) for k in fresh), "round 1 did not train the head"
    oracle = {k: v.numpy().copy() for k, v in head1.items()}

    reply = client_app(_train_message(tiny_cfg, pool, body, 2, lr=0.0), node)
    assert not reply.has_error(), reply.error
    head2 = node.state[head_key].to_torch_state_dict()
    for key, value in oracle.items():
        np.testing.assert_array_equal(head2[key].numpy(), value)
    returned = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(returned[k], body[k]) for k in body)  # lr=0 really froze the model


def test_a_float16_model_keeps_its_dtype_through_a_round_and_saves_in_it(tiny_cfg, half_path, pool, tmp_path):
    """Server start body -> the ClientApp's train handler on 3 nodes -> the strategy's validation and fusion ->
    save_fused_model: float16 all the way, and the saved model loads in float16."""
    cfg = compose_config("quick", [f"model.cache_dir={tiny_cfg.model.cache_dir}", f"model.name_or_path={half_path}",
                                   "client.max_steps=3", "tasks.train_size=200", "tasks.test_size=100"])
    contributing = [e for e in pool if e["role"] == "contributing"][:3]
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)])
    start = initial_body(half_path)
    assert {v.dtype for v in start.values()} == {torch.float16}
    strategy = ColdFusion(pool=contributing, contributors_per_round=3, seed=0, eval_schedule={"probe": None},
                          eval_start=False, query_config={"model": model_json(cfg)},
                          body_signature=body_signature(start))  # the nodes' float16 layout must match it
    train, evaluate = round_configs(cfg, model_json(cfg))
    result = strategy.start(grid, ArrayRecord(start), num_rounds=1, timeout=60, train_config=train,
                            evaluate_config=evaluate)
    sent = [m.content["arrays"].to_torch_state_dict() for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    bodies = [r.content["arrays"].to_torch_state_dict() for r in grid.replies
              if r.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == len(bodies) == 3 and all(not r.has_error() for r in grid.replies)
    assert {v.dtype for b in sent + bodies for v in b.values()} == {torch.float16}
    assert all(torch.isfinite(v).all() for b in bodies for v in b.values())
    fused = result.arrays.to_torch_state_dict()
    assert {v.dtype for v in fused.values()} == {torch.float16}
    for key in start:  # the uniform mean of the float16 replies, computed in numpy
        oracle = np.mean([b[key].numpy().astype(np.float64) for b in bodies], axis=0)
        np.testing.assert_allclose(fused[key].numpy().astype(np.float64), oracle, rtol=2 ** -10, atol=1e-7)
    assert any(not torch.equal(fused[k], start[k]) for k in start)

    out = save_fused_model(half_path, fused, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    saved = AutoModel.from_pretrained(out).state_dict()
    assert {v.dtype for v in saved.values()} == {torch.float16}
    assert all(torch.equal(saved[k], fused[k]) for k in fused)


def test_reinit_policy_starts_each_round_from_a_fresh_head(tiny_cfg, tiny_path, pool, node):
    body = initial_body(tiny_path)
    client_app(_train_message(tiny_cfg, pool, body, 1, head_policy="reinit"), node)
    assert not any(k.startswith("head:") for k in node.state), "reinit must not store heads"
    # same round, same seed: identical result, whatever happened before (no hidden head reuse)
    a = client_app(_train_message(tiny_cfg, pool, body, 3, head_policy="reinit"), node)
    b = client_app(_train_message(tiny_cfg, pool, body, 3, head_policy="reinit"), node)
    ta, tb = a.content["arrays"].to_torch_state_dict(), b.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _train_rows(cfg, pool):
    """The node's tokenised task (info, data) and tokenizer, as the ClientApp loads them."""
    from app.site.contributor import _prepare

    config = {"model": model_json(cfg), "task-entry": entry_key(pool[2])}
    info, _, tokenizer, data = _prepare(config, int(cfg.client.max_length))
    return info, tokenizer, data


@torch.inference_mode()
def _mean_loss(path, body, head, rows, tokenizer) -> float:
    """Cross-entropy of body + head over every row, in eval mode: a classifier built by transformers itself,
    the body loaded under its base-model prefix (strict: nothing left at random)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    config = AutoConfig.from_pretrained(path, num_labels=len(head["classifier.out_proj.bias"]))
    model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict({**{f"roberta.{k}": v for k, v in body.items()}, **head}, strict=True)
    model.eval()
    total = 0.0
    for batch in DataLoader(rows, batch_size=64, collate_fn=DataCollatorWithPadding(tokenizer)):
        total += model(**batch).loss.item() * len(batch["labels"])
    return total / len(rows)


def test_train_runs_its_epoch_budget_and_lowers_the_training_loss(tiny_cfg, tiny_path, pool, node):
    """client.epochs=1.5 and no step limit over 200 rows in batches of 32: 7 batches a pass (6 of 32 and one of
    8), so ceil(1.5 x 7) = 11 steps: one pass (200 rows) and 4 full batches of the next (128), 328 examples.
    The trained body and head together have a lower loss on those rows than the body and head it started from
    (lr=1e-2: measured 1.610 -> 1.553; at the default 1e-3 the tiny random model moves by 5e-4 only)."""
    info, tokenizer, data = _train_rows(tiny_cfg, pool)
    assert len(data["train"]) == 200 and int(tiny_cfg.client.batch_size) == 32  # the oracle's premises
    body = initial_body(tiny_path)
    head_key = f"head:{pool[2]['name']}"
    fresh_node = Context(run_id=1, node_id=8, node_config=dict(node.node_config), state=RecordDict(), run_config={})
    client_app(_train_message(tiny_cfg, pool, body, 1, lr=0.0, max_steps=1), fresh_node)
    fresh_head = fresh_node.state[head_key].to_torch_state_dict()  # the head a first contribution starts from

    reply = client_app(_train_message(tiny_cfg, pool, body, 1, max_steps=None, epochs=1.5, lr=1e-2), node)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert (metrics["steps"], metrics["num-examples"]) == (11, 200 + 4 * 32)
    trained_body = reply.content["arrays"].to_torch_state_dict()
    trained_head = node.state[head_key].to_torch_state_dict()
    before = _mean_loss(tiny_path, body, fresh_head, data["train"], tokenizer)
    after = _mean_loss(tiny_path, trained_body, trained_head, data["train"], tokenizer)
    assert after < before - 0.02, (before, after)


def _evaluate_message(cfg, path, entry, views: str, role: str = "contributing") -> Message:
    _, evaluate = round_configs(cfg, model_json(cfg))
    config = ConfigRecord({**dict(evaluate), "task-entry": entry_key(entry), "server-round": 0, "views": views,
                           "role": role})
    return Message(content=RecordDict({"arrays": ArrayRecord(initial_body(path)), "config": config}),
                   message_type=MessageType.EVALUATE, dst_node_id=7)


def _macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over the classes present in labels or predictions of 2PR/(P+R), 0 where undefined."""
    scores = []
    for c in np.union1d(labels, predictions):
        tp = np.sum((predictions == c) & (labels == c))
        fp, fn = np.sum((predictions == c) & (labels != c)), np.sum((predictions != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def test_evaluate_reports_the_accuracy_of_the_predictions_on_the_test_rows(tiny_cfg, tiny_path, pool, node,
                                                                           monkeypatch):
    """Each view's reported accuracy and macro-F1 are those of its predictions on the test split's rows,
    recomputed here in numpy from the predictions the view made (captured on their way to the metric)."""
    import app.learning.probe as probe_module
    import app.learning.recipe as recipe_module

    made: dict[str, list] = {"probe": [], "finetune": []}
    predict, probe_metrics = recipe_module.predict, probe_module.task_metrics

    def recording_predict(*args, **kwargs):
        out = predict(*args, **kwargs)
        made["finetune"].append(out)
        return out

    def recording_metrics(predictions, labels, regression):
        made["probe"].append((np.asarray(predictions), np.asarray(labels)))
        return probe_metrics(predictions, labels, regression)

    monkeypatch.setattr(recipe_module, "predict", recording_predict)
    monkeypatch.setattr(probe_module, "task_metrics", recording_metrics)
    reply = client_app(_evaluate_message(tiny_cfg, tiny_path, pool[2], "probe,finetune"), node)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    _, _, data = _train_rows(tiny_cfg, pool)
    test_labels = np.asarray([row["labels"] for row in data["test"]])  # tokenised lazily: row by row
    assert metrics["num-examples"] == len(test_labels) == 100
    # the test rows are all 100 (max_test_examples=100): a view scores them in its own (seeded) order
    on_test = {view: [(p, y) for p, y in calls if len(y) == len(test_labels)] for view, calls in made.items()}
    # probe: the first-token fit's test predictions come first (the paper's view, app/learning/probe.py POOLINGS)
    for (predictions, labels), name in zip(on_test["probe"], ("probe.accuracy", "probe.mean_pool_accuracy"),
                                           strict=True):
        assert sorted(labels) == sorted(test_labels)
        assert metrics[name] == pytest.approx(float(np.mean(predictions == labels)), abs=1e-12), name
    first_token = on_test["probe"][0]
    assert metrics["probe.macro_f1"] == pytest.approx(_macro_f1(*first_token), abs=1e-12)
    (predictions, labels), = on_test["finetune"]  # its dev rows are fewer (eval.probe/finetune.max_dev_examples)
    assert sorted(labels) == sorted(test_labels)
    assert metrics["finetune.accuracy"] == pytest.approx(float(np.mean(predictions == labels)), abs=1e-12)
    assert metrics["finetune.macro_f1"] == pytest.approx(_macro_f1(predictions, labels), abs=1e-12)
    assert metrics["finetune.steps"] == tiny_cfg.eval.finetune.max_steps


def test_node_task_entry_from_node_config(pool, tmp_path):
    assert node_task_entry({"partition-id": 4}, pool)["name"] == pool[4]["name"]
    assert node_task_entry({"task": pool[1]["name"]}, pool)["name"] == pool[1]["name"]
    entry = node_task_entry({"task": "mine", "data-dir": str(tmp_path)}, pool)
    assert entry == {"source": "local", "path": str(tmp_path), "name": "mine"}
    with pytest.raises(TaskDataError, match="partition-id 99 has no task"):
        node_task_entry({"partition-id": 99}, pool)
    with pytest.raises(TaskDataError, match="'nope' is not in the server's task pool"):
        node_task_entry({"task": "nope"}, pool)
